"""The paper's settings, kept once, and the table of how a run's config deviates from them.

Every setting an implementation needs, with what the paper (Section 3.1, or the authors' model
code as described in the method notes) states, or :data:`NOT_STATED` where it states nothing.
:func:`deviations` compares a workflow config against it; the workflow writes the result to
``results/tables/deviations.{csv,md}`` and the report shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

#: Marks a setting the paper does not state (any value is then a choice of this workflow).
NOT_STATED = object()


@dataclass(frozen=True)
class PaperSetting:
    """One setting: its config key (``section.key``), the paper's value and where it says so."""

    key: str
    value: Any
    source: str


PAPER_SETTINGS: tuple[PaperSetting, ...] = (
    PaperSetting("splits.n_splits", 5, "Sec. 3.1: five random splits"),
    PaperSetting("splits.n_train", 20, "Sec. 3.1: 20 images for training"),
    PaperSetting("splits.n_val", 0, "Sec. 3.1: no validation part is described"),
    PaperSetting("splits.n_test", 23, "Sec. 3.1: the rest 23 for testing"),
    PaperSetting("registration.engine", "flirt", "Sec. 3.1: linearly co-registered with FSL FLIRT"),
    PaperSetting("registration.dof", NOT_STATED, "'linearly' only"),
    PaperSetting("train.widths", [32, 64, 128, 256, 512], "3D U-Net backbone (authors' code, method notes)"),
    PaperSetting("train.dropout", 0.2, "stem Dropout3d (authors' code, method notes)"),
    PaperSetting("train.rsa_order", ["sagittal", "coronal", "axial"], "Sec. 2.2, Fig. 4"),
    PaperSetting("train.batch_size", 4, "Sec. 3.1: batch size of 4"),
    PaperSetting("train.iterations", 800, "Sec. 3.1: stop after 800 iterations"),
    PaperSetting("train.lr", 1e-3, "Sec. 3.1: Adam, initial learning rate 1e-3"),
    PaperSetting("train.attention_lr", None, "Sec. 3.1: one learning rate for all weights (null = train.lr)"),
    PaperSetting("train.attention_init", 0.0, "authors' code (method notes): every alpha initialised to 0; the NCL output norm's scale too"),
    PaperSetting("train.lr_schedule", NOT_STATED, "'initial learning rate' only; no schedule given"),
    PaperSetting("train.weight_decay", 1e-5, "Sec. 3.1: weight decay of 1e-5"),
    PaperSetting("train.lesion_weight", "printed", "Sec. 3.1: exponential class weights e^r/(e^r+e^(1-r)), as printed"),
    PaperSetting("train.dice_weight", 0.0, "Sec. 3.1: the weighted cross-entropy alone"),
    PaperSetting("train.crop", NOT_STATED, "'random crop with fixed cropping size'; the size is not given"),
    PaperSetting("train.lesion_crop_prob", 0.0, "Sec. 3.1: random crops, no lesion-centred sampling described"),
    PaperSetting("train.min_lesion_crops", 0, "Sec. 3.1: random crops, no lesion-centred sampling described"),
    PaperSetting("model.output_bias", "none", "authors' code: the 1x1x1 output conv has no bias (method notes)"),
    PaperSetting("train.amp", NOT_STATED, "precision not stated (Titan XP, 2019)"),
    PaperSetting("train.seeds", 1, "one training per split"),
    PaperSetting("train.seeds_by_variant", {}, "one training per split, every variant"),
    PaperSetting("predict.tile", NOT_STATED, "inference on the test images not described"),
    PaperSetting("predict.overlap", NOT_STATED, "inference on the test images not described"),
    PaperSetting("predict.blending", NOT_STATED, "inference on the test images not described"),
)


#: Settings fixed in the code rather than the config, and why (docs/models.md has the measurements).
CODE_SETTINGS: dict[str, Any] = {
    # Without it a voxel whose decoder features are all off sits at p = 0.5 and short trainings
    # marked lesions that way: an empty mask at p > 0.5 (docs/models.md, "The output bias").
    "model.output_bias": "trainable, starts at lesion p = 0.01 (rsanet.models.LESION_PRIOR)",
}


def _get(config: Mapping, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _show(v: Any) -> str:
    if v is NOT_STATED:
        return "not stated"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def deviations(config: Mapping, engines: list[str] | None = None) -> pd.DataFrame:
    """Each paper setting against the run's config.

    Args:
        config: the validated workflow config (defaults applied).
        engines: registration engines that actually ran (``auto`` resolves to one of them).

    Returns:
        Columns ``setting, paper, this_run, status, source``; ``status`` is ``"as in the paper"``,
        ``"deviates"`` or ``"not stated in the paper"``.
    """
    preset = _get(config, "preset")
    rows = [{"setting": "preset", "paper": "paper", "this_run": _show(preset),
             "status": "as in the paper" if preset == "paper" else "deviates",
             "source": f"config/presets/{preset}.yaml under the run's own config (its keys win; rows below)"}]
    for s in PAPER_SETTINGS:
        ours = CODE_SETTINGS[s.key] if s.key in CODE_SETTINGS else _get(config, s.key)
        if s.key == "registration.engine" and engines:
            ours = "+".join(engines) if ours == "auto" else ours
        if s.key == "splits.n_test" and ours is None:
            ours = "all the others"
        n_val = _get(config, "splits.n_val") or 0
        if s.key == "splits.n_train" and n_val:
            # the models are fitted on n_train - n_val subjects: the validation part is held out
            ours = f"{ours} ({ours - n_val} fitted + {n_val} validation)"
        if s.value is NOT_STATED:
            status = "not stated in the paper"
        elif s.key == "splits.n_train" and n_val:
            status = "deviates"
        else:
            status = "as in the paper" if _same(ours, s.value) else "deviates"
        rows.append({"setting": s.key, "paper": _show(s.value), "this_run": _show(ours), "status": status,
                     "source": s.source})
    return pd.DataFrame(rows)
