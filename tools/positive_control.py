"""Positive control of the study's comparison: can it detect a difference that is known to exist?

Run after a study (it reads ``results/preprocessed/``, ``results/splits.json`` and the 3D U-Net's
per-subject test metrics ``results/metrics/unet3d/split*/seed0.csv``):

    python tools/positive_control.py                    # the 3D U-Net at half its iterations
    python tools/positive_control.py --fraction 0.25    # a larger known difference

On every split it trains the 3D U-Net again with the study's own settings, seed rule and code
(``rsanet.stages.train.train_step``), but for ``--fraction`` of ``train.iterations``, predicts and scores
the split's test subjects with the study's own prediction step (``rsanet.stages.train.predict_step``),
and compares the two arms with the study's own comparison (``rsanet.evaluation.compare_arms``:
the corrected resampled t-test over splits, its detectable difference and power) on every
Table 1 metric. ``--seeds 1`` (seed index 0 of both arms) is the single-seed design of most
variants; ``--seeds 4`` that of the main comparison (``train.seeds_by_variant``). The negative control is the attention switched off (``training_health.md``).

Writes ``--out`` (default ``docs/positive_control.md``) and a CSV beside it; the models and
predictions stay in ``--scratch``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _arm(job: dict) -> str:
    """Train and predict one split of the shortened arm (one process, one thread)."""
    from rsanet.stages.train import predict_step, train_step

    out = Path(job["scratch"]) / f"split{job['split']}" / f"seed{job['seed_index']}"
    model = out / "model.pt"
    if not model.exists():
        t0 = time.perf_counter()
        train_step("unet3d", job["split"], job["splits_json"], job["preprocessed"], job["train_cfg"], str(model),
                   str(out / "train_log.csv"), str(out / "health.json"), str(out / "checkpoint.pt"), threads=1,
                   seed_index=job["seed_index"])
        print(f"  split {job['split']} seed index {job['seed_index']}: trained in {time.perf_counter() - t0:.0f} s",
              flush=True)
    metrics = out / "metrics.csv"
    if not metrics.exists():
        predict_step(str(model), job["split"], job["splits_json"], job["preprocessed"], str(out / "predictions"),
                     str(metrics), job["predict"], job["evaluation"], threads=1, device="cpu", seed=job["seed_index"])
    return str(metrics)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--results", default=str(REPO / "results"))
    p.add_argument("--fraction", type=float, default=0.5, help="share of train.iterations the control arm trains")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per split in both arms (seed indices 0..N-1; the study must have them)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--scratch", default=str(REPO / "results" / "positive_control"))
    p.add_argument("--out", default=str(REPO / "docs" / "positive_control.md"))
    args = p.parse_args(argv)

    import pandas as pd

    from rsanet import evaluation
    from rsanet.checks import load_config

    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    results = Path(args.results)
    splits_json = results / "splits.json"
    splits = json.loads(splits_json.read_text())
    n_splits = len(splits["splits"])
    full = [results / "metrics" / "unet3d" / f"split{k}" / f"seed{s}.csv" for k in range(n_splits)
            for s in range(args.seeds)]
    missing = [str(f) for f in full if not f.exists()]
    if missing:
        raise SystemExit(f"the study's 3D U-Net metrics are missing ({', '.join(missing)}): run the study first")
    iterations = max(1, round(cfg["train"]["iterations"] * args.fraction))
    train_cfg = {k: v for k, v in cfg["train"].items() if k not in ("seeds", "seeds_by_variant")}
    train_cfg["iterations"] = iterations
    scratch = Path(args.scratch) / f"iterations{iterations}"  # one folder per seed index inside
    preprocessed = {f.stem: str(f) for f in (results / "preprocessed").glob("*.npz")}
    jobs = [{"split": k, "seed_index": s, "splits_json": str(splits_json), "preprocessed": preprocessed,
             "train_cfg": train_cfg, "scratch": str(scratch), "predict": dict(cfg["predict"]),
             "evaluation": dict(cfg["evaluation"])}
            for k in range(n_splits) for s in range(args.seeds)]
    print(f"positive control: the 3D U-Net at {iterations} of {cfg['train']['iterations']} iterations on "
          f"{n_splits} splits", flush=True)
    with mp.get_context("spawn").Pool(args.processes) as pool:
        short = pool.map(_arm, jobs)

    # per split, the mean over the arm's seeds (as the study's tables do)
    full_rows = evaluation.mean_over_seeds(pd.concat([pd.read_csv(f) for f in full], ignore_index=True))
    short_rows = evaluation.mean_over_seeds(pd.concat([pd.read_csv(f) for f in short], ignore_index=True))
    records = []
    for metric in evaluation.TABLE1_METRICS:
        res = evaluation.compare_arms(short_rows, full_rows, metric, int(splits["n_train"]))
        records.append({"metric": metric, "full (%)": 100 * full_rows[metric].mean(),
                        "shortened (%)": 100 * short_rows[metric].mean(), **res})
    table = pd.DataFrame(records).drop(columns=["paper_difference_pp", "power_for_paper"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    detected = table[table.p < 0.05]
    header = (
        f"# Positive control: the 3D U-Net at {iterations} against {cfg['train']['iterations']} iterations\n\n"
        f"Both arms: the study's settings ({Path(args.config).name}), seed indices 0–{args.seeds - 1} per split "
        f"(each split's score the mean over them), the same {n_splits} splits "
        f"(n_train = {splits['n_train']}), the same test subjects, the same prediction and scoring; the full arm is "
        f"the study's own 3D U-Net. Compared with the study's corrected resampled t-test "
        f"(`rsanet.evaluation.compare_arms`). Commit {commit}; "
        f"`python tools/positive_control.py --fraction {args.fraction} --seeds {args.seeds}`.\n\n"
        f"The comparison detects the known difference (p < 0.05) on {len(detected)} of {len(table)} Table 1 "
        f"metrics.\n\n")
    shown = table.copy()
    for c in ("full (%)", "shortened (%)", "mean_difference_pp", "ci_low_pp", "ci_high_pp", "sd_pp", "detectable_pp"):
        shown[c] = shown[c].map(lambda v: f"{v:.2f}")
    shown["p"] = shown["p"].map(lambda v: f"{v:.4f}")
    shown["t"] = shown["t"].map(lambda v: f"{v:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.write_text(header + evaluation.to_markdown(shown))
    print(header + evaluation.to_markdown(shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
