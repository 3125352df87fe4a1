"""Five seeded random train/test splits of the cohort (Section 3.1: 20 train / 23 test)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def make_splits(
    subjects: Sequence[str], n_splits: int = 5, n_train: int = 20, n_test: int | None = None, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Draw ``n_splits`` independent random partitions into train and test subjects.

    Each split shuffles the sorted subject ids with its own generator
    (``numpy.random.default_rng([seed, split])``), so the result depends only on the set of
    ids, ``seed`` and the split index - not on the order of the sheet. ``n_test`` defaults to
    all remaining subjects. Lists inside each split are sorted.

    Returns:
        ``[{"train": [...], "test": [...]}, ...]`` of length ``n_splits``.
    """
    ids = sorted(subjects)
    if len(set(ids)) != len(ids):
        raise ValueError("make_splits: subject ids are not unique")
    n_test = len(ids) - n_train if n_test is None else n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > len(ids):
        raise ValueError(
            f"make_splits: {n_train} train + {n_test} test subjects do not fit a cohort of {len(ids)}"
        )
    splits = []
    for k in range(n_splits):
        order = np.random.default_rng([seed, k]).permutation(len(ids))
        chosen = [ids[i] for i in order]
        splits.append({"train": sorted(chosen[:n_train]), "test": sorted(chosen[n_train : n_train + n_test])})
    return splits
