"""The demo cohort's steps (workflow/rules/demo.smk): one synthetic subject per job.

Each step reads its files, calls the package's pure code and writes its outputs through
:func:`rsanet.files.staged`; a script of ``scripts/`` calls one of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping


# Heavy libraries (torch, matplotlib, SimpleITK, pandas) are imported inside the steps that need
# them, so light steps start in a fraction of a second (pandas: 0.15-0.26 s for each of the demo's
# 164 synthesis, registration, preprocessing and training jobs, which do not use it).



log = logging.getLogger(__name__)


def demo_config(demo: Mapping) -> "object":
    """The workflow's validated ``demo:`` config section as a :class:`rsanet.demo.DemoConfig`."""
    from ..demo import DemoConfig

    return DemoConfig(
        n_subjects=int(demo["n_subjects"]),
        seed=int(demo["seed"]),
        grid_scale=float(demo["grid_scale"]),
        max_rotation_deg=float(demo["max_rotation_deg"]),
        max_translation_mm=float(demo["max_translation_mm"]),
    )


def demo_subject_step(subject: str, demo: Mapping, outputs: Mapping[str, str]) -> None:
    """Synthesise demo subject ``demo-NNN`` into the folder of ``outputs``."""
    from ..demo import make_subject, subject_id, write_subject

    index = int(subject.split("-")[-1]) - 1
    if subject_id(index) != subject:
        raise ValueError(f"{subject!r} is not a demo subject id (demo-001, demo-002, ...)")
    written = write_subject(make_subject(index, demo_config(demo)), Path(outputs["flair"]).parent)
    log.info("%s written: %s", subject, ", ".join(str(p) for p in written.values()))

