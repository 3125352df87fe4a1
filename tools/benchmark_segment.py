"""Time rsanet-segment on one real patient: stages and total, median of --repeats runs.

    python tools/benchmark_segment.py --model results/export/<variant> [--patient patient07] [--repeats 3]
    python tools/benchmark_segment.py --paper-width      # 5 untrained paper-width U-Nets (timing only)

``--paper-width`` builds an export of five *untrained* networks at the paper's widths and crop (the
time of a prediction does not depend on the weights), to measure what a paper-sized ensemble costs
on this machine. Prints the stage timings of ``summary.json`` and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def paper_width_export(folder: Path, n_models: int = 5) -> Path:
    import torch

    from rsanet.models import build_model
    from rsanet.training import TrainConfig, TrainResult, save_model
    from rsanet.checks import load_config

    cfg = load_config(REPO / "config" / "config.yaml", REPO / "workflow" / "schemas" / "config.schema.yaml", preset="paper")
    out = folder / "unet3d"
    out.mkdir(parents=True)
    names = []
    for k in range(n_models):
        torch.manual_seed(k)
        tcfg = TrainConfig.from_dict({**cfg["train"], "variant": "unet3d", "seed": k})
        model = build_model("unet3d", widths=tcfg.widths, dropout=tcfg.dropout)
        save_model(TrainResult(state_dict=model.state_dict()), tcfg, out / f"model_split{k}_seed0.pt")
        names.append(f"model_split{k}_seed0.pt")
    meta = {"format": 1, "rsanet_version": "timing", "variant": "unet3d (untrained, timing only)", "models": names,
            **{k: cfg[k] for k in ("registration", "preprocess", "predict", "train", "evaluation")}}
    (out / "export.json").write_text(json.dumps(meta))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--paper-width", action="store_true")
    p.add_argument("--patient", default="patient07")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "open_ms_data"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from rsanet.segment import segment

    patient = Path(args.data) / "patients_mni" / args.patient
    with tempfile.TemporaryDirectory() as tmp:
        model = paper_width_export(Path(tmp)) if args.paper_width else Path(args.model)
        walls, stages = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            summary = segment(model, str(patient / "T1.nii.gz"), str(patient / "T2.nii.gz"),
                              str(patient / "FLAIR.nii.gz"), Path(tmp) / f"out{r}", device="cpu")
            walls.append(time.perf_counter() - t0)
            stages.append(summary["seconds"])
            print(f"run {r + 1}: {walls[-1]:.1f} s {summary['seconds']}", flush=True)
    med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    print(f"{args.patient}, {summary['model']['n_models']} models ({summary['model']['variant']}): median wall "
          f"{statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f}); median stages {med}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
