"""The calibrated lesion confidence: its maths (rsanet.calibration) and how ensembles and exported
models are picked (rsanet.stages.export.ensemble_members, rsanet.export.ensemble_models)."""
import json

import numpy as np
import pandas as pd
import pytest

from rsanet import calibration as cal
from rsanet.export import ensemble_models, run_key
from rsanet.stages.export import ensemble_members


def _lesions(n: int, seed: int) -> pd.DataFrame:
    """Synthetic lesions whose chance of being real rises with agreement and size (seeded)."""
    rng = np.random.default_rng(seed)
    agreement = rng.integers(0, 5, n) / 4
    volume = 10 ** rng.uniform(0.5, 3.0, n)
    mean_p = np.clip(0.5 + 0.3 * agreement + rng.normal(0, 0.05, n), 0.5, 1.0)
    logit = -3.0 + 4.0 * agreement + 0.8 * np.log10(volume)
    real = rng.random(n) < 1 / (1 + np.exp(-logit))
    return pd.DataFrame({"agreement": agreement, "mean_probability": mean_p, "volume_mm3": volume,
                         "true_positive": real})


def test_the_calibrator_fitted_on_one_sample_is_calibrated_on_another():
    fit, test = _lesions(3000, seed=0), _lesions(3000, seed=1)
    model = cal.fit_calibrator(fit, n_subjects=30)
    p = model.probability(test)
    assert p.shape == (3000,) and ((p > 0) & (p < 1)).all()
    assert cal.expected_calibration_error(p, test.true_positive) < 0.05
    # the raw agreement read as a probability is not calibrated here (real lesions at agreement 0)
    assert cal.expected_calibration_error(test.agreement, test.true_positive) > 0.1
    agreement_coef, _, volume_coef = model.coef
    assert agreement_coef > 0 and volume_coef > 0
    # stored in export.json and read back: the same probabilities
    again = cal.LesionCalibrator.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(again.probability(test), p)


def test_ece_brier_and_the_reliability_table_by_hand():
    p = np.array([0.05] * 10 + [0.95] * 10)
    y = np.array([1] + [0] * 9 + [1] * 9 + [0])
    table = cal.reliability_table(p, y)
    assert list(table.bin) == ["0.0-0.1", "0.9-1.0"] and list(table.lesions) == [10, 10]
    assert np.allclose(table.observed, [0.1, 0.9]) and np.allclose(table.mean_predicted, [0.05, 0.95])
    assert cal.expected_calibration_error(p, y) == pytest.approx(0.05)
    assert cal.brier_score(p, y) == pytest.approx((0.95 ** 2 + 9 * 0.05 ** 2) / 10)
    assert np.isnan(cal.expected_calibration_error(np.zeros(0), np.zeros(0)))


def test_separated_or_one_class_lesions_still_give_a_finite_fit():
    lesions = _lesions(200, seed=2).assign(true_positive=True)
    p = cal.fit_calibrator(lesions, n_subjects=3).probability(lesions)
    assert np.isfinite(p).all() and (p > 0.9).all()
    with pytest.raises(ValueError, match="no lesion"):
        cal.fit_calibrator(lesions.iloc[:0], n_subjects=0)


def test_cross_validation_predicts_each_subject_from_the_others_only():
    lesions = _lesions(400, seed=3)
    groups = np.array(["a", "b"] * 200)
    oof = cal.cross_validated_probability(lesions, groups)
    on_b = cal.fit_calibrator(lesions[groups == "b"], n_subjects=1).probability(lesions[groups == "a"])
    assert np.array_equal(oof[groups == "a"], on_b)
    assert np.isnan(cal.cross_validated_probability(lesions, ["a"] * 400)).all()


def test_split_and_seed_ensembles_and_the_exported_models():
    folders = {(k, s): f"pred/split{k}/seed{s}" for k in (0, 2, 3) for s in ((0, 1) if k == 2 else (0,))}
    # split: the first seed of every split that held the subject out; seed: all seeds of the first split with two
    assert ensemble_members([0, 2, 3], folders, "split") == ["pred/split0/seed0", "pred/split2/seed0",
                                                              "pred/split3/seed0"]
    assert ensemble_members([0, 2, 3], folders, "seed") == ["pred/split2/seed0", "pred/split2/seed1"]
    assert ensemble_members([0], folders, "split") == [] and ensemble_members([0, 3], folders, "seed") == []
    models = [f"m/v/split{k}/seed{s}/model.pt" for k in (1, 0, 10) for s in (1, 0)]
    assert [run_key(p) for p in ensemble_models(models, "split")] == [(0, 0), (1, 0), (10, 0)]
    assert [run_key(p) for p in ensemble_models(models, "seed")] == [(0, 0), (0, 1)]
    assert len(ensemble_models(models, None)) == 6
