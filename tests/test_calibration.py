"""The calibrated lesion confidence: its maths (rsanet.calibration) and how ensembles and exported
models are picked (rsanet.stages.export.ensemble_members, rsanet.export.ensemble_models)."""
import json
from pathlib import Path

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


def _write_study(root: Path, n_subjects: int = 12, n_splits: int = 3, n_seeds: int = 2):
    """Synthetic split predictions on disk, as the predict and predict_validation rules write them:
    true lesions predicted well, false blobs predicted with each model's own (seeded) conviction."""
    from rsanet.volumes import save_probability_u8

    rng = np.random.default_rng(0)
    subjects = [f"s{i:02d}" for i in range(n_subjects)]
    shape = (8, 32, 32)
    truths, pre = {}, {}
    for s in subjects:
        truth = np.zeros(shape, np.uint8)
        for _ in range(3):
            z, y, x = rng.integers(1, 5), rng.integers(2, 27), rng.integers(2, 27)
            truth[z:z + 2, y:y + 3, x:x + 3] = 1
        truths[s] = truth
        pre[s] = str(root / "pre" / f"{s}.npz")
        (root / "pre").mkdir(parents=True, exist_ok=True)
        np.savez(pre[s], lesions=truth, spacing=np.array([3.0, 1.0, 1.0]))
    parts, test_pred, val_pred = [], {}, {}
    for k in range(n_splits):
        order = [subjects[i] for i in np.random.default_rng(10 + k).permutation(n_subjects)]
        part = {"train": order[:5], "val": order[5:7], "test": order[7:]}
        parts.append(part)
        for seed in range(n_seeds):
            for kind, names, out in (("val", part["val"], val_pred), ("test", part["test"], test_pred)):
                folder = root / kind / f"split{k}" / f"seed{seed}"
                folder.mkdir(parents=True)
                out[(k, seed)] = str(folder)
                for s in names:
                    r = np.random.default_rng([subjects.index(s), k, seed])
                    prob = 0.05 * r.random(shape)
                    prob[truths[s] > 0] = r.uniform(0.5, 1.0)
                    # four false blobs (at the subject's own places), each model convinced to its own degree
                    places = np.random.default_rng([subjects.index(s), 99])
                    for _ in range(4):
                        z, y, x = places.integers(0, 6), places.integers(0, 30), places.integers(0, 30)
                        blob = (slice(z, z + 2), slice(y, y + 2), slice(x, x + 2))
                        prob[blob] = np.where(truths[s][blob] > 0, prob[blob], r.uniform(0.2, 0.9))
                    save_probability_u8(prob, folder / f"{s}_prob_u8.npz")
    (root / "splits.json").write_text(json.dumps({"splits": parts}))
    return test_pred, val_pred, pre, parts


def test_calibration_step_fits_on_validation_subjects_and_measures_on_the_others(tmp_path):
    from rsanet.stages.export import lesion_calibration_step

    test_pred, val_pred, pre, parts = _write_study(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    record = lesion_calibration_step("rsa-111", str(tmp_path / "splits.json"), test_pred, val_pred, pre,
                                     {"min_lesion_mm3": 0.0}, 0.5, 6, str(out / "r.json"), str(out / "l.csv"),
                                     str(out / "rel.csv"), str(out / "fig"))
    val = sorted({s for p in parts for s in p["val"]})
    assert record["calibration_subjects"] == val and not set(record["test_subjects"]) & set(val)
    lesions = pd.read_csv(out / "l.csv")
    assert set(lesions[lesions.role == "calibration"].subject) <= set(val)
    assert set(lesions[lesions.role == "test"].subject) <= set(record["test_subjects"])
    # the seed ensemble is the 2 seeds of one split; the split ensemble one model per split holding the subject out
    assert set(lesions[lesions.ensemble == "seed"].n_models) == {2}
    held = {s: sum(s in p["val"] + p["test"] for p in parts) for s in lesions.subject}
    split_rows = lesions[lesions.ensemble == "split"]
    assert (split_rows.n_models == split_rows.subject.map(held)).all()
    # both kinds on the same subjects; the chosen one has the lower cross-validated Brier score
    assert set(lesions[lesions.ensemble == "seed"].subject) == set(split_rows.subject)
    kinds = record["kinds"]
    assert set(kinds) == {"split", "seed"}
    assert record["chosen"] == min(kinds, key=lambda k: kinds[k]["calibration"]["cv_brier"])
    for kind, e in kinds.items():
        assert e["calibrator"] is not None and 0 <= e["test"]["ece"] <= 1
        assert sum(r["lesions"] for r in e["test"]["reliability"]) == e["test"]["lesions"] > 0
        assert e["calibration"]["lesions"] == int(((lesions.ensemble == kind) & (lesions.role == "calibration")).sum())
    assert lesions.probability_real.between(0, 1).all()
    rel = pd.read_csv(out / "rel.csv")
    assert set(rel.score) == {"calibrated", "agreement"}
    assert (out / "fig.png").is_file() and json.loads((out / "r.json").read_text()) == json.loads(json.dumps(record))


@pytest.mark.parametrize("calibrated", [True, False])
def test_the_export_holds_the_chosen_ensemble_and_its_calibrator(tmp_path, calibrated):
    from rsanet.checks import load_config
    from rsanet.export import export_step, read_export
    from rsanet.segment import lesion_calibrator
    from rsanet.stages.export import lesion_calibration_step

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "config" / "config.yaml", root / "workflow" / "schemas" / "config.schema.yaml")
    models = []
    for k in range(3):
        for s in range(2):
            path = tmp_path / "models" / "rsa-111" / f"split{k}" / f"seed{s}" / "model.pt"
            path.parent.mkdir(parents=True)
            path.write_bytes(f"{k}{s}".encode())
            models.append(str(path))
    for name in ("table1", "table2"):
        (tmp_path / f"{name}.csv").write_text("variant,sample_dice_mean,sample_dice_sd\nrsa-111,50.0,5.0\n")
    calibration = None
    if calibrated:
        test_pred, val_pred, pre, _ = _write_study(tmp_path / "study")
        record = lesion_calibration_step("rsa-111", str(tmp_path / "study" / "splits.json"), test_pred, val_pred,
                                         pre, {"min_lesion_mm3": 0.0}, 0.5, 6, str(tmp_path / "r.json"),
                                         str(tmp_path / "l.csv"), str(tmp_path / "rel.csv"), str(tmp_path / "fig"))
        calibration = {"rsa-111": str(tmp_path / "r.json")}
    export_step("rsa-111", str(tmp_path / "table1.csv"), str(tmp_path / "table2.csv"), {"rsa-111": models}, config,
                ["a", "b"], str(tmp_path / "export"), calibration=calibration)
    meta = read_export(tmp_path / "export" / "rsa-111")
    card = (tmp_path / "export" / "rsa-111" / "MODEL_CARD.md").read_text()
    if not calibrated:
        assert len(meta["models"]) == 6 and lesion_calibrator(meta) is None
        assert "No calibrated lesion probability" in card
        return
    kind = record["chosen"]
    assert meta["models"] == [f"model_split{k}_seed{s}.pt" for k, s in map(run_key, ensemble_models(models, kind))]
    assert meta["lesion_calibration"]["ensemble"] == kind
    assert lesion_calibrator(meta) == cal.LesionCalibrator.from_dict(record["kinds"][kind]["calibrator"])
    assert f"the **{kind} ensemble** ({len(meta['models'])} networks)" in card
    assert f"{record['kinds'][kind]['test']['ece']:.3f}" in card and "Reliability of the exported" in card
