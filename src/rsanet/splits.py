"""Seeded random train/validation/test splits of the cohort (Section 3.1: 20 train / 23 test).

Each split partitions the subjects into ``train`` (what the network is fitted on), ``val`` (a
validation part carved out of the paper's training subjects: never used for fitting, the only
data any setting may be chosen on) and ``test`` (scored, never looked at when choosing).
With ``n_val = 0`` the splits are the paper's ``n_train`` / ``n_test``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

#: How often a split is redrawn before concluding that the cohort cannot give distinct splits.
_MAX_DRAWS = 1000


def count_distinct_splits(n_subjects: int, n_train: int, n_test: int, n_val: int = 0) -> int:
    """How many different (train, val, test) partitions a cohort of ``n_subjects`` allows."""
    fit = n_train - n_val
    rest = n_subjects - n_train
    return math.comb(n_subjects, fit) * math.comb(n_subjects - fit, n_val) * math.comb(rest, n_test)


def make_splits(
    subjects: Sequence[str], n_splits: int = 5, n_train: int = 20, n_test: int | None = None, seed: int = 0,
    n_val: int = 0, groups: Mapping[str, str] | None = None,
) -> list[dict[str, list[str]]]:
    """Draw ``n_splits`` distinct random partitions into train, validation and test subjects.

    Split ``k`` shuffles the sorted subject ids with ``numpy.random.default_rng([seed, k])``
    (redrawn with ``[seed, k, attempt]`` while it repeats an earlier split), so the result
    depends only on the set of ids, ``seed`` and ``k`` - not on the order of the sheet. The first
    ``n_train`` shuffled ids are the paper's training subjects; the last ``n_val`` of them form
    the validation part, the others ``train``; the next ``n_test`` (default: all remaining) are
    ``test``. Lists inside each split are sorted.

    ``groups`` maps each case to the person it belongs to (e.g. BIDS sessions of one
    participant). The participants are then split as above - the sizes count participants - and
    every case goes to its participant's part, so no person is in both training and test data.

    Raises:
        ValueError: sizes that do not fit the cohort, or a cohort too small for ``n_splits``
            distinct splits (the message says how many it can give).

    Returns:
        ``[{"train": [...], "val": [...], "test": [...]}, ...]`` of length ``n_splits``.
    """
    if groups is not None:
        if len(set(subjects)) != len(subjects):
            raise ValueError("make_splits: subject ids are not unique")
        missing = sorted(set(subjects) - set(groups))
        if missing:
            raise ValueError(f"make_splits: no participant given for {', '.join(missing)}")
        try:
            people = make_splits(sorted({groups[s] for s in subjects}), n_splits, n_train, n_test, seed, n_val)
        except ValueError as err:  # the sizes count participants, not cases
            raise ValueError(f"{err} (with sessions grouped, the split sizes and the cohort count participants: "
                             f"{len({groups[s] for s in subjects})} participants, {len(subjects)} cases)") from err
        return [{part: sorted(s for s in subjects if groups[s] in set(split[part])) for part in split}
                for split in people]
    ids = sorted(subjects)
    if len(set(ids)) != len(ids):
        raise ValueError("make_splits: subject ids are not unique")
    n_test = len(ids) - n_train if n_test is None else n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > len(ids):
        raise ValueError(
            f"make_splits: {n_train} train + {n_test} test subjects do not fit a cohort of {len(ids)}"
        )
    if not 0 <= n_val < n_train:
        raise ValueError(f"make_splits: splits.n_val = {n_val} must be >= 0 and leave at least one of the "
                         f"splits.n_train = {n_train} training subjects to fit on; lower splits.n_val")
    possible = count_distinct_splits(len(ids), n_train, n_test, n_val)
    if n_splits > possible:
        raise ValueError(
            f"make_splits: a cohort of {len(ids)} subjects gives only {possible} distinct splits of "
            f"{n_train - n_val} train / {n_val} validation / {n_test} test, fewer than n_splits = {n_splits}; "
            f"set splits.n_splits to at most {possible} or change the split sizes"
        )
    splits: list[dict[str, list[str]]] = []
    seen: set[tuple] = set()
    for k in range(n_splits):
        for attempt in range(_MAX_DRAWS):
            key = [seed, k] if attempt == 0 else [seed, k, attempt]
            chosen = [ids[i] for i in np.random.default_rng(key).permutation(len(ids))]
            split = {
                "train": sorted(chosen[: n_train - n_val]),
                "val": sorted(chosen[n_train - n_val : n_train]),
                "test": sorted(chosen[n_train : n_train + n_test]),
            }
            signature = tuple(tuple(split[part]) for part in ("train", "val", "test"))
            if signature not in seen:
                break
        else:  # pragma: no cover - only when nearly every possible split is already taken
            raise ValueError(f"make_splits: no new distinct split found for split {k} after {_MAX_DRAWS} draws")
        seen.add(signature)
        splits.append(split)
    return splits
