#!/usr/bin/env python
"""Check the CUDA path and time the paper's settings on this machine's GPU.

    python tools/gpu_check.py --preset paper --iterations 60 --out results/gpu_check

What it does, on synthetic subjects of the paper's size (nothing is read from disk but the
config), for each variant of the config:

1. agreement: the same weights on CPU (fp32) and on CUDA (fp32 without TF32, and bf16 autocast,
   as training and prediction run) give the same lesion probabilities (max |difference|);
2. training: ``rsanet.training.train`` for ``--iterations`` iterations with the config's widths,
   crop, batch and precision, with a checkpoint half-way and a resume from it; seconds per
   iteration (median over the iterations after the first 10) and peak GPU memory;
3. prediction: the config's ``rsanet.inference.PredictionPolicy`` (as in the workflow) on one
   paper-sized volume (median of 3) and its peak GPU memory;

then the time the whole study's training and prediction would take on this GPU (35 trainings
of ``train.iterations`` and 7 x 5 x ``n_test`` predictions, one job at a time; variants not
timed count at the mean of those timed). Deterministic mode (``train.deterministic``) is set
process-wide by the first training and stays on for the rest of the run, as in a workflow job.
Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out``. Exits 1 without a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from rsanet.inference import PredictionPolicy  # noqa: E402
from rsanet.models import build_model  # noqa: E402
from rsanet.devices import memory_layout  # noqa: E402
from rsanet.training import TrainConfig, train  # noqa: E402
from rsanet.checks import load_config  # noqa: E402
from rsanet.volumes import Preprocessed  # noqa: E402

# A brain cropped from the paper's 0.7 x 0.7 x 3 mm grid: about 48 axial slices of 240 x 200.
PAPER_VOLUME = (48, 240, 200)


def synthetic_subject(shape: tuple[int, int, int], seed: int) -> Preprocessed:
    """A subject of the given (D, H, W) size: smooth random contrasts and ~20 spherical lesions."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    lesions = np.zeros(shape, np.uint8)
    for _ in range(20):
        c = rng.uniform((2, 10, 10), (d - 2, h - 10, w - 10))
        r = rng.uniform(1.5, 4.0)
        lesions |= (((zz - c[0]) * 3) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < (r * 3) ** 2).astype(np.uint8)
    image = rng.normal(0, 1, (3,) + shape).astype(np.float32)
    image[1:] += 3.0 * lesions  # bright on T2 and FLAIR
    image[0] -= 2.0 * lesions   # dark on T1
    return Preprocessed(image=image, lesions=lesions, brain=np.ones(shape, np.uint8),
                        spacing=(3.0, 0.7, 0.7), bbox=np.array([[0, d], [0, h], [0, w]]),
                        full_shape=shape, affine=np.eye(4))


def agreement(variant: str, widths: tuple[int, ...]) -> dict[str, float]:
    """Max |p_cpu - p_cuda| of the lesion probability, fp32 and bf16 autocast on CUDA."""
    torch.manual_seed(0)
    model = build_model(variant, widths=widths).eval()
    with torch.no_grad():  # random, non-zero attention scales so the attention paths count
        for name, p in model.named_parameters():
            if name.startswith("attn_") and (name.endswith("alpha") or name.endswith("norm.weight")):
                p.uniform_(0.2, 1.0)
    x = torch.randn(1, 3, 16, 64, 64)
    out = {}
    with torch.inference_mode():
        ref = torch.softmax(model(x), 1)[:, 1]
        cuda_model = model.cuda()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        out["fp32_max_abs_diff"] = float((torch.softmax(cuda_model(x.cuda()), 1)[:, 1].cpu() - ref).abs().max())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            p16 = torch.softmax(cuda_model(x.cuda()).float(), 1)[:, 1].cpu()
        out["bf16_max_abs_diff"] = float((p16 - ref).abs().max())
        torch.backends.cudnn.allow_tf32 = True
    return out


def _reset_peak(cpu: bool) -> None:
    if not cpu:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(cpu: bool) -> float:
    return float("nan") if cpu else torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--preset", default="paper", help="the preset under --config (config/presets/)")
    p.add_argument("--iterations", type=int, default=60, help="timed training iterations per variant")
    p.add_argument("--variants", nargs="*", default=None, help="default: the config's variants")
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check"))
    p.add_argument("--volume", nargs=3, type=int, default=PAPER_VOLUME, help="synthetic subjects' (D, H, W)")
    p.add_argument("--device", default="cuda", help="'cpu' for a dry run of this script (no agreement check)")
    args = p.parse_args(argv)
    if args.iterations < 12:
        p.error("--iterations must be at least 12 (the first 10 are not timed)")
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch: nothing to check", file=sys.stderr)
        return 1
    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml", args.preset)
    tcfg = dict(cfg["train"])
    variants = args.variants or cfg["variants"]
    n_test = int(cfg["splits"]["n_test"])
    n_splits = int(cfg["splits"]["n_splits"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = "CPU (dry run)" if cpu else torch.cuda.get_device_name(0)
    print(f"GPU {gpu}, torch {torch.__version__}, config {args.config}, preset {args.preset}", flush=True)
    torch.backends.cudnn.benchmark = True

    policy = PredictionPolicy.from_config(cfg["predict"], tcfg["crop"], amp=bool(tcfg["amp"]))  # as the workflow
    volume = tuple(args.volume)
    subjects = [synthetic_subject(volume, seed) for seed in range(4)]
    rows = []
    for variant in variants:
        row: dict = {"variant": variant}
        if not cpu:
            row.update(agreement(variant, tuple(tcfg["widths"][:4])))
        config = TrainConfig.from_dict({**tcfg, "variant": variant, "iterations": args.iterations,
                                        "checkpoint_every": args.iterations // 2, "device": args.device})
        with tempfile.TemporaryDirectory() as tmp:
            _reset_peak(cpu)
            full = train(config, subjects, checkpoint=Path(tmp) / "ckpt.pt")
            row["train_peak_gib"] = _peak_gib(cpu)
            seconds = [r["seconds"] for r in full.log_rows]
            steps = np.diff(seconds)[10:]
            row["s_per_iteration"] = float(np.median(steps))
            # resume from the half-way checkpoint: the second half runs again from there
            resumed = train(config, subjects, checkpoint=Path(tmp) / "ckpt.pt")
            row["resumed_from"] = resumed.resumed_from
            a = np.array([r["loss"] for r in resumed.log_rows])
            b = np.array([r["loss"] for r in full.log_rows])
            row["resume_max_rel_loss_diff"] = float(np.max(np.abs(a - b) / np.abs(b)))
        device = torch.device(args.device)
        model = build_model(variant, widths=config.widths, dropout=config.dropout, rsa_order=config.rsa_order)
        model = model.to(device, memory_format=memory_layout(device)).eval()
        model.load_state_dict(full.state_dict)
        times = []
        _reset_peak(cpu)
        with torch.inference_mode():
            for _ in range(4):
                t = time.perf_counter()
                prob = policy.predict(model, subjects[0].image, args.device)
                times.append(time.perf_counter() - t)
        row["predict_s"] = statistics.median(times[1:])
        row["predict_peak_gib"] = _peak_gib(cpu)
        row["prob_finite"] = bool(np.isfinite(prob).all())
        del model
        if not cpu:
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)

    iters = int(cfg["train"]["iterations"])
    # the study's variants, those not run here counted at the mean of those that were
    scale = len(cfg["variants"]) / len(rows)
    train_h = scale * sum(r["s_per_iteration"] for r in rows) * iters * n_splits / 3600
    predict_h = scale * sum(r["predict_s"] for r in rows) * n_splits * n_test / 3600
    summary = {"gpu": gpu, "torch": torch.__version__, "config": args.config, "volume": volume,
               "timed_iterations": args.iterations, "policy": policy.describe(), "rows": rows,
               "study_train_hours": train_h, "study_predict_hours": predict_h}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# GPU check: {gpu}, torch {torch.__version__}", "",
             f"Config `{args.config}`, preset `{args.preset}`; synthetic subjects of {volume} voxels; prediction: {policy.describe()}.", "",
             "| variant | CPU vs CUDA fp32 | vs bf16 | s/iteration | train peak GiB | predict s/volume "
             "| predict peak GiB | resume (rel. loss difference) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('fp32_max_abs_diff', float('nan')):.1e} | "
                     f"{r.get('bf16_max_abs_diff', float('nan')):.1e} | "
                     f"{r['s_per_iteration']:.3f} | {r['train_peak_gib']:.1f} | {r['predict_s']:.2f} | "
                     f"{r['predict_peak_gib']:.1f} | from {r['resumed_from']}, "
                     f"losses within {r['resume_max_rel_loss_diff']:.1e} |")
    lines += ["", f"Whole study ({len(cfg['variants'])} variants; {len(rows)} timed here), one job at a time "
              f"on this GPU: training {60 * train_h:.0f} min ({n_splits} splits x {iters} iterations "
              f"per variant), prediction {60 * predict_h:.1f} min ({n_splits} x {n_test} volumes per variant)."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
