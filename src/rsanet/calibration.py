"""Per-lesion confidence that means what it says: the probability that a predicted lesion is real.

An ensemble's raw per-lesion ``agreement`` (the fraction of its models that detect the lesion) is
not a probability: in the demo study its precision was not monotone at the low end, and on the
real patients the models agreed confidently on mostly wrong lesions. Here a lesion's features
(:data:`FEATURES`, from :func:`rsanet.segment.lesion_table`) are mapped to the probability that it
overlaps a true lesion by a logistic regression (Platt scaling with three inputs), fitted on the
lesions of the study's *validation* subjects and scored on its test subjects
(:func:`rsanet.stages.export.lesion_calibration_step`; docs/inference.md, "Calibrated lesion
confidence").

Pure functions on tables and arrays; no file I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

#: The lesion table's columns the calibrator reads; ``log10_volume_mm3`` is computed from ``volume_mm3``.
FEATURES = ("agreement", "mean_probability", "log10_volume_mm3")

#: Equal-width bins of the predicted probability for the reliability table and the ECE.
N_BINS = 10


def lesion_features(lesions: pd.DataFrame) -> np.ndarray:
    """``(N, 3)`` float64: each lesion's :data:`FEATURES` (agreement in [0, 1], mean ensemble
    probability in [0, 1], log10 of the volume in mm³) from a :func:`rsanet.segment.lesion_table`."""
    return np.column_stack([lesions.agreement.to_numpy(float), lesions.mean_probability.to_numpy(float),
                            np.log10(np.maximum(lesions.volume_mm3.to_numpy(float), 1e-3))])


@dataclass(frozen=True)
class LesionCalibrator:
    """A fitted logistic map from a lesion's features to the probability that it is real.

    ``p = 1 / (1 + exp(-(intercept + coef . (x - mean) / scale)))`` with ``x`` the lesion's
    :data:`FEATURES`. ``n_lesions`` and ``n_subjects``: what it was fitted on."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    n_lesions: int
    n_subjects: int

    def probability(self, lesions: pd.DataFrame) -> np.ndarray:
        """``(N,)`` float64 in (0, 1): the calibrated probability of each lesion (row) being real."""
        if not len(lesions):
            return np.zeros(0)
        z = (lesion_features(lesions) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(self.intercept + z @ np.asarray(self.coef))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LesionCalibrator":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # = 1 / (1 + exp(-t)), without overflow


def fit_calibrator(lesions: pd.DataFrame, n_subjects: int, ridge: float = 1.0) -> LesionCalibrator:
    """Fit :class:`LesionCalibrator` to lesions with a ``true_positive`` column.

    Logistic regression on the standardised features, penalised by ``ridge / 2 * |coef|²`` (not the
    intercept: it keeps the fit finite when the classes separate or a feature is constant), by
    Newton's method (deterministic; converges in a few steps). ``n_subjects``: recorded only.

    Raises:
        ValueError: no lesion to fit.
    """
    if not len(lesions):
        raise ValueError("no lesion to calibrate on")
    x = lesion_features(lesions)
    y = lesions.true_positive.to_numpy(float)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    a = np.column_stack([np.ones(len(x)), (x - mean) / scale])  # (N, 1 + F)
    penalty = np.diag([0.0] + [ridge] * x.shape[1])
    # start at the base rate (clipped so that an all-true or all-false set starts finite)
    rate = float(np.clip(y.mean(), 0.5 / len(y), 1 - 0.5 / len(y)))
    w = np.zeros(a.shape[1])
    w[0] = np.log(rate / (1 - rate))
    for _ in range(100):
        p = _sigmoid(a @ w)
        grad = a.T @ (p - y) + penalty @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return LesionCalibrator(features=FEATURES, mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
                            coef=tuple(map(float, w[1:])), intercept=float(w[0]), n_lesions=len(x),
                            n_subjects=int(n_subjects))


def reliability_table(p: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Predicted against observed, per equal-width bin of the predicted probability.

    Args:
        p: ``(N,)`` predicted probabilities in [0, 1].
        y: ``(N,)`` outcomes (1 = the lesion is real).
    Returns:
        One row per non-empty bin: ``bin`` ("0.9-1.0"), ``lesions``, ``mean_predicted``,
        ``observed`` (the fraction real), both in [0, 1].
    """
    p, y = np.asarray(p, float), np.asarray(y, float)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            rows.append({"bin": f"{b / n_bins:.1f}-{(b + 1) / n_bins:.1f}", "lesions": int(sel.sum()),
                         "mean_predicted": float(p[sel].mean()), "observed": float(y[sel].mean())})
    return pd.DataFrame(rows, columns=["bin", "lesions", "mean_predicted", "observed"])


def expected_calibration_error(p: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: the lesion-weighted mean of ``|mean_predicted - observed|`` over the
    :func:`reliability_table`'s bins, in [0, 1] (0 = calibrated); NaN without lesions."""
    table = reliability_table(p, y, n_bins)
    if not len(table):
        return float("nan")
    return float(np.average((table.mean_predicted - table.observed).abs(), weights=table.lesions))


def brier_score(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of the probabilities against the outcomes, in [0, 1]; NaN without lesions."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def cross_validated_probability(lesions: pd.DataFrame, groups: Sequence[str], n_folds: int = 5) -> np.ndarray:
    """Out-of-fold calibrated probabilities: the subjects (``groups``, one per lesion) are dealt in
    sorted order into ``min(n_folds, subjects)`` folds; each fold's lesions are predicted by a
    calibrator fitted on the other folds. ``(N,)``; NaN where fewer than two subjects exist."""
    groups = np.asarray(groups)
    subjects = sorted(set(groups))
    out = np.full(len(lesions), np.nan)
    if len(subjects) < 2:
        return out
    k = min(n_folds, len(subjects))
    fold_of = {s: i % k for i, s in enumerate(subjects)}
    folds = np.array([fold_of[g] for g in groups])
    for f in range(k):
        train = folds != f
        model = fit_calibrator(lesions[train], n_subjects=len({g for g in groups[train]}))
        out[~train] = model.probability(lesions[~train])
    return out
