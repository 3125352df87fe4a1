"""The splits step (workflow/rules/splits.smk): the random splits, written once and read by every later step.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence


# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).
from ..volumes import (
    save_json,
)



log = logging.getLogger(__name__)


def splits_step(splits: Sequence[Mapping[str, Sequence[str]]], out: str, seed: int) -> None:
    """Write the splits the workflow planned with (``common.smk`` draws them once, at parse time)
    as one JSON file: ``{"seed": ..., "n_train": ..., "n_val": ..., "n_test": ..., "splits": [...]}``.

    The jobs read this file and the input functions use the same list, so the two cannot drift.
    """
    splits = [{part: list(s[part]) for part in ("train", "val", "test")} for s in splits]
    first = splits[0]
    save_json({"seed": seed, "n_train": len(first["train"]), "n_val": len(first["val"]),
               "n_test": len(first["test"]), "splits": splits}, out)
    log.info("%d splits: %d train / %d validation / %d test subjects", len(splits), len(first["train"]),
             len(first["val"]), len(first["test"]))


def read_split(splits_json: str, split: int) -> dict[str, list[str]]:
    return json.loads(Path(splits_json).read_text())["splits"][int(split)]

