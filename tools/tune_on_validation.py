"""Measure the study's settings on the validation parts of the splits only (never on test subjects).

Run by hand after the study's preprocessing (``snakemake --until splits preprocess``, or a
finished study); it reads ``results/preprocessed/*.npz`` and ``results/splits.json`` and trains
its own networks in a scratch folder, so it never touches the study's models:

    python tools/tune_on_validation.py settings --splits 0 1 2      # the demo's training settings
    python tools/tune_on_validation.py policy --splits 0 1 2        # the inference policy
    python tools/tune_on_validation.py seeds --seeds 0 1 2 3 4      # seed-to-seed spread
    python tools/tune_on_validation.py health --splits 0 1 2 3 4 --seeds 0 1 2 3   # do trainings learn?
    python tools/tune_on_validation.py paper-loss --splits 0 1 --seeds 0 1   # printed vs swapped weights

``settings``: the config's ``train:`` section (the baseline) and one change at a time back to
the paper's value (lesion weight, Dice term, learning rate, schedule, dropout) or to twice the
iterations; one 3D U-Net per split and setting, scored on the split's validation subjects.
``policy``: the baseline networks (3D U-Net and RSA-111) predict the validation subjects under
each candidate inference policy (whole volume; tiles of the training crop or twice it, with
several overlaps, Gaussian or plain blending); Dice and seconds per volume. ``seeds``: the
baseline 3D U-Net of split 0 trained with several seeds; validation and test Dice per seed
(test Dice is reported only as the size of the training noise; no setting is chosen on it).
``health``: the baseline 3D U-Net on every split and seed given (the workflow's seed rule);
per training its validation sample Dice, the health check's verdict, and a summary (failures,
trainings below 20 % validation Dice, the seed-to-seed sd on split 0). ``paper-loss``: the
training settings of ``config/presets/paper.yaml`` (800 iterations, batch 4, no Dice term, constant
rate) at the demo's widths and crop, with the paper's class weights as printed and swapped.
``--set key=value`` changes a ``train:`` setting of the baseline (e.g. to measure an alternative).

Each prints a Markdown table and writes it, with a CSV, to ``--out`` (default ``docs/tuning/``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _train_one(job: dict) -> dict:
    """Train one network (one process, one thread) and return where its weights are."""
    import torch

    from rsanet.training import TrainConfig, TrainingFailed, save_model, train
    from rsanet.volumes import Preprocessed

    torch.set_num_threads(1)
    out = Path(job["out"])
    stopped = Path(str(out) + ".stopped.txt")  # a training its health check stopped (on_failure: fail)
    if not out.exists() and not stopped.exists():
        subjects = [Preprocessed.load(p) for p in job["train_files"]]
        validation = [Preprocessed.load(p) for p in job["val_files"]]  # the health check's patches
        cfg = TrainConfig.from_dict({**job["train_cfg"], "variant": job["variant"], "seed": job["seed"]})
        t0 = time.perf_counter()
        try:
            result = train(cfg, subjects, threads=1, validation=validation)
        except TrainingFailed as err:
            stopped.write_text(str(err))
            print(f"  stopped {out.name} after {time.perf_counter() - t0:.0f} s: {err}", flush=True)
            return job
        save_model(result, cfg, out)
        print(f"  trained {out.parent.name}/{out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return job


def _score(model_path: str, files: list[str], policy: dict, attention_switched_off: bool = False) -> dict:
    """Sample Dice, voxel Dice and seconds per volume of one model under one policy (with its
    attention switched off if asked: rsanet.models.attention_off)."""
    import contextlib

    import torch

    from rsanet.inference import Predictor
    from rsanet.metrics import dice_from_counts, evaluate_case
    from rsanet.models import attention_off
    from rsanet.volumes import Preprocessed

    torch.set_num_threads(1)
    predictor = Predictor.from_model_files([model_path], policy, "cpu")  # as the study's predict rule
    dices, tp, fp, fn, seconds, tiles = [], 0, 0, 0, [], 0
    with attention_off(predictor.models[0]) if attention_switched_off else contextlib.nullcontext():
        for f in files:
            pre = Preprocessed.load(f)
            tiles += predictor.policy.tiles(pre.image.shape[1:])
            t0 = time.perf_counter()
            prob = predictor.probability(pre.image)
            seconds.append(time.perf_counter() - t0)
            s = evaluate_case(predictor.lesions(prob), pre.lesions > 0, pre.spacing)
            dices.append(s["dice"])
            tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
    return {"sample_dice": float(np.mean(dices)), "voxel_dice": dice_from_counts(tp, fp, fn),
            "seconds_per_volume": float(np.median(seconds)), "tiles": tiles}


def _score_attention_job(args: tuple) -> dict:
    """:func:`_score` of one model with its attention as trained (``off`` False) or switched off."""
    job, files, policy, off = args
    return _score(job["out"], files, policy, attention_switched_off=off)


def _markdown(table: pd.DataFrame) -> str:
    from rsanet.evaluation import to_markdown

    return to_markdown(table)


def _score_job(args: tuple) -> dict:
    job, files, policy, extra = args
    return {**extra, **_score(job["out"], files, policy)}


def _jobs_for(cfg: dict, splits: list[dict], split_ids, variant: str, train_cfg: dict, name: str,
              results: Path, scratch: Path, seed_index: int = 0) -> list[dict]:
    jobs = []
    for k in split_ids:
        seed = int(train_cfg["seed"]) + k + 1000 * seed_index  # the workflow's seed rule
        jobs.append({
            "variant": variant, "split": k, "setting": name, "seed": seed, "train_cfg": train_cfg,
            "train_files": [str(results / "preprocessed" / f"{s}.npz") for s in splits[k]["train"]],
            "val_files": [str(results / "preprocessed" / f"{s}.npz") for s in splits[k]["val"]],
            # the file name holds a hash of the settings, so a changed config never reuses a model
            "out": str(scratch / f"{name}-{variant}-split{k}-seed{seed}-{_digest(train_cfg)}.pt"),
        })
    return jobs


def _digest(train_cfg: dict) -> str:
    """Hash of the settings and of the training code (models, losses, training), so neither a
    changed config nor changed code ever reuses a model of the scratch folder."""
    import hashlib

    h = hashlib.sha256(json.dumps(train_cfg, sort_keys=True).encode())
    for name in ("models.py", "losses.py", "training.py"):
        h.update((REPO / "src" / "rsanet" / name).read_bytes())
    return h.hexdigest()[:10]


def _files(results: Path, names: list[str]) -> list[str]:
    return [str(results / "preprocessed" / f"{s}.npz") for s in names]


def _write(table: pd.DataFrame, out: Path, name: str, header: str) -> None:
    from rsanet.evaluation import to_markdown

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(header + "\n\n" + to_markdown(table))
    print(header + "\n\n" + to_markdown(table))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["settings", "policy", "seeds", "health", "paper-loss", "attention"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change train: settings of the baseline (YAML values), e.g. min_lesion_crops=0")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--results", default=str(REPO / "results"))
    p.add_argument("--splits", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--only", type=int, nargs="*", default=None,
                   help="settings, policy: measure only these rows of the table (0 = the first)")
    p.add_argument("--variants", nargs="*", default=["unet3d", "rsa-111"], help="policy: the networks measured")
    p.add_argument("--study-models", action="store_true",
                   help="policy, attention: predict with the study's own networks (results/models/) instead of training here")
    p.add_argument("--attention-lrs", nargs="*", default=["null", "0.01", "0.03", "0.1"],
                   help="attention: train.attention_lr candidates (null = train.lr, the paper)")
    p.add_argument("--attention-variants", nargs="*", default=["rsa-111", "ncl-111"], help="attention: the variants")
    p.add_argument("--out", default=str(REPO / "docs" / "tuning"))
    p.add_argument("--name", default="health", help="health: the output table's name (health.md, health.csv)")
    p.add_argument("--scratch", default=str(REPO / "results" / "tuning"))
    args = p.parse_args(argv)

    from rsanet.checks import load_config

    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    results, scratch, out = Path(args.results), Path(args.scratch), Path(args.out)
    scratch.mkdir(parents=True, exist_ok=True)
    splits = json.loads((results / "splits.json").read_text())["splits"]
    if not all(splits[k]["val"] for k in args.splits):
        raise SystemExit("the splits have no validation part: set splits.n_val > 0 and rerun the splits rule")
    base = {k: v for k, v in cfg["train"].items() if k != "seeds"}
    import yaml

    changed = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    unknown = sorted(set(changed) - set(base))
    if unknown:
        raise SystemExit(f"--set: unknown train setting(s) {', '.join(unknown)}")
    base.update(changed)
    set_note = f" --set {' '.join(args.set)}" if args.set else ""
    pool = mp.get_context("spawn").Pool(args.processes)
    commit = _commit()
    tag = "" if Path(args.config).resolve() == (REPO / "config" / "config.yaml").resolve() else Path(args.config).stem + "-"
    scratch = scratch / tag.rstrip("-") if tag else scratch
    scratch.mkdir(parents=True, exist_ok=True)

    if args.what == "settings":
        changes = {
            "baseline (config)": {},
            "lesion_weight: printed (paper's weights)": {"lesion_weight": "printed"},
            "dice_weight: 0 (paper's loss)": {"dice_weight": 0.0},
            "lr: 1e-3 (paper)": {"lr": 1e-3},
            "lr_schedule: constant": {"lr_schedule": "constant"},
            "dropout: 0.2 (paper)": {"dropout": 0.2},
            f"iterations: {2 * base['iterations'] // 3}": {"iterations": 2 * base["iterations"] // 3},
            f"iterations: {2 * base['iterations']}": {"iterations": 2 * base["iterations"]},
        }
        jobs = []
        for i, (name, change) in enumerate(changes.items()):
            if args.only is None or i in args.only:
                jobs += _jobs_for(cfg, splits, args.splits, "unet3d", {**base, **change}, f"s{i}", results, scratch)
        pool.map(_train_one, jobs)
        names = list(changes)
        scored = pool.map(_score_job, [(j, _files(results, splits[j["split"]]["val"]), cfg["predict"],
                                        {"setting": names[int(j["setting"][1:])], "split": j["split"]}) for j in jobs])
        df = pd.DataFrame(scored)
        table = df.groupby("setting", sort=False)[["sample_dice", "voxel_dice"]].agg(["mean", "min"]).mul(100).round(1)
        table.columns = [f"{a} {b}" for a, b in table.columns]
        table = table.reset_index()
        header = (f"Validation Dice (%) of the 3D U-Net, mean and minimum over splits {args.splits} "
                  f"({len(splits[0]['val'])} validation subjects each), one change at a time; commit {commit}; "
                  f"`python tools/tune_on_validation.py settings --splits {' '.join(map(str, args.splits))}`")
        _write(table, out, tag + "settings", header.replace("one change at a time;", f"one change at a time from {Path(args.config).name};"))
    elif args.what == "policy":
        jobs = []
        for variant in args.variants:
            jobs += _jobs_for(cfg, splits, args.splits, variant, base, "s0", results, scratch)
        if args.study_models:
            # the study's own networks (trained by the workflow on the same splits with the same seed rule)
            for j in jobs:
                j["out"] = str(results / "models" / j["variant"] / f"split{j['split']}" / "seed0" / "model.pt")
                if not Path(j["out"]).exists():
                    raise SystemExit(f"--study-models: {j['out']} does not exist; run the study first")
        else:
            pool.map(_train_one, jobs)
        crop = list(base["crop"])
        double = [2 * c for c in crop]
        policies = {
            "whole volume, one pass": {"tile": "whole", "overlap": 0.0, "blending": "constant"},
            "crop tiles, overlap 0": {"tile": None, "overlap": 0.0, "blending": "constant"},
            "crop tiles, overlap 0.2, gaussian": {"tile": None, "overlap": 0.2, "blending": "gaussian"},
            "crop tiles, overlap 0.25, gaussian": {"tile": None, "overlap": 0.25, "blending": "gaussian"},
            "crop tiles, overlap 0.5, constant": {"tile": None, "overlap": 0.5, "blending": "constant"},
            "crop tiles, overlap 0.5, gaussian": {"tile": None, "overlap": 0.5, "blending": "gaussian"},
            "2x crop tiles, overlap 0.25, gaussian": {"tile": double, "overlap": 0.25, "blending": "gaussian"},
            "2x crop tiles, overlap 0.5, gaussian": {"tile": double, "overlap": 0.5, "blending": "gaussian"},
        }
        # each candidate is the config's predict: section with these keys changed (complete, as the workflow's)
        chosen = [name for i, name in enumerate(policies) if args.only is None or i in args.only]
        tasks = [(j, _files(results, splits[j["split"]]["val"]), {**cfg["predict"], **policies[name]},
                  {"policy": name, "variant": j["variant"], "split": j["split"]}) for name in chosen for j in jobs]
        df = pd.DataFrame(pool.map(_score_job, tasks))
        wide = df.pivot_table(index="policy", columns="variant", values="sample_dice", aggfunc="mean", sort=False).mul(100).round(1)
        wide.columns = [f"sample Dice {c}" for c in wide.columns]
        if len(args.variants) > 2:
            wide.insert(0, "sample Dice, all variants", df.groupby("policy", sort=False).sample_dice.mean().mul(100).round(1))
        secs = df.groupby("policy", sort=False).seconds_per_volume.median().round(2).rename("s / volume (1 thread)")
        tiles = df.groupby("policy", sort=False).tiles.sum().rename("tiles predicted")
        table = wide.join(secs).join(tiles).reset_index()
        batch = cfg["predict"]["batch_size"]
        networks = "the study's own networks" if args.study_models else "networks trained here"
        header = (f"Validation sample Dice (%) per inference policy, mean over splits {args.splits} "
                  f"({networks}); "
                  f"seconds per volume, median, one thread, batches of {batch} tiles; tiles predicted, all "
                  f"validation volumes; commit {commit}; `python tools/tune_on_validation.py policy --splits "
                  f"{' '.join(map(str, args.splits))} --variants {' '.join(args.variants)}"
                  f"{' --study-models' if args.study_models else ''}`")
        _write(table, out, "policy", header)
    elif args.what == "health":
        jobs = []
        for s in args.seeds:
            jobs += _jobs_for(cfg, splits, args.splits, "unet3d", base, "s0", results, scratch, seed_index=s)
        pool.map(_train_one, jobs)
        df = pd.DataFrame(pool.map(_score_job, [(j, _files(results, splits[j["split"]]["val"]), cfg["predict"],
                                                 {"split": j["split"], "seed": j["seed"]}) for j in jobs]))
        verdicts = [_health(j["out"]) for j in jobs]
        df["health_score"] = [round(v["score"], 3) for v in verdicts]
        df["learned"] = [v["learned"] for v in verdicts]
        df[["sample_dice", "voxel_dice"]] = df[["sample_dice", "voxel_dice"]].mul(100).round(1)
        table = df[["split", "seed", "sample_dice", "voxel_dice", "health_score", "learned"]].rename(
            columns={"sample_dice": "val sample Dice", "voxel_dice": "val voxel Dice"})
        split0 = table[table.split == 0]["val sample Dice"]
        header = (
            f"Do the trainings learn? The 3D U-Net of {Path(args.config).name}{set_note} on splits {args.splits}, "
            f"seeds {args.seeds} (seed = train.seed + split + 1000 x index), scored on each split's "
            f"{len(splits[0]['val'])} validation subjects; commit {commit}; "
            f"`python tools/tune_on_validation.py health --splits {' '.join(map(str, args.splits))} "
            f"--seeds {' '.join(map(str, args.seeds))}{set_note}`\n\n"
            f"- trainings that failed the health check: {int((~table.learned).sum())} of {len(table)}\n"
            f"- validation sample Dice below 20 %: {int((table['val sample Dice'] < 20).sum())} of {len(table)}; "
            f"min {table['val sample Dice'].min():.1f}, median {table['val sample Dice'].median():.1f}, "
            f"sd {table['val sample Dice'].std():.1f} points\n"
            + (f"- split 0, seed-to-seed sd of the validation sample Dice: {statistics.stdev(split0):.2f} points "
               f"({len(split0)} seeds)\n" if len(split0) > 1 else ""))
        _write(table, out, tag + args.name, header)
    elif args.what == "attention":
        jobs = []
        if args.study_models:  # the study's own trained networks, seed index 0
            for variant in args.attention_variants:
                jobs += [{"variant": variant, "split": k, "attention_lr": str(base.get("attention_lr")),
                          "out": str(results / "models" / variant / f"split{k}" / "seed0" / "model.pt")}
                         for k in args.splits]
        else:
            for lr in args.attention_lrs:
                setting = {**base, "attention_lr": yaml.safe_load(lr)}
                for variant in args.attention_variants:
                    jobs += [dict(j, attention_lr=lr) for j in
                             _jobs_for(cfg, splits, args.splits, variant, setting, "att", results, scratch)]
            pool.map(_train_one, jobs)
        tasks = [(j, _files(results, splits[j["split"]]["val"]), cfg["predict"], off)
                 for j in jobs for off in (False, True)]
        scored = pool.map(_score_attention_job, tasks)
        rows = []
        for j, on, off in zip(jobs, scored[0::2], scored[1::2]):
            check = _health(j["out"]).get("attention", {})
            rows.append({
                "attention_lr": j["attention_lr"], "variant": j["variant"], "split": j["split"],
                "val sample Dice": round(100 * on["sample_dice"], 2),
                "off: val sample Dice": round(100 * off["sample_dice"], 2),
                "Δ off (points)": round(100 * (off["sample_dice"] - on["sample_dice"]), 2),
                "patch Dice on": round(100 * check.get("dice_on", float("nan")), 2),
                "patch Dice off": round(100 * check.get("dice_off", float("nan")), 2),
                "changed voxels (%)": round(100 * check.get("changed_share", float("nan")), 2),
                "max |scale|": round(max(abs(v) for vs in check.get("scales", {"": [0.0]}).values() for v in vs), 3),
            })
        table = pd.DataFrame(rows)
        table["|Δ off| (points)"] = table["Δ off (points)"].abs()
        summary = table.groupby(["attention_lr", "variant"], sort=False)[
            ["val sample Dice", "Δ off (points)", "|Δ off| (points)", "changed voxels (%)", "max |scale|"]
        ].mean().round(2).reset_index()
        source = "the study's own models (results/models, seed index 0)" if args.study_models else "trained here"
        header = (
            f"Does the attention learn, and does it matter? {', '.join(args.attention_variants)} ({source}) of "
            f"{Path(args.config).name}{set_note} with each train.attention_lr (null = train.lr = {base['lr']}, the "
            f"paper), splits {args.splits}, scored on each split's validation subjects only (whole volumes, the "
            f"study's prediction policy) with the attention as trained and switched off (rsanet.models.attention_off); "
            f"'changed voxels' and the patch Dice are the training's own attention check; commit {commit}; "
            f"`python tools/tune_on_validation.py attention --splits {' '.join(map(str, args.splits))} "
            + (f"--study-models --attention-variants {' '.join(args.attention_variants)}" if args.study_models else
               f"--attention-lrs {' '.join(args.attention_lrs)}") + f"{set_note}`\n\nMean over splits:\n\n"
            + _markdown(summary) + "\n\nPer training:")
        _write(table, out, tag + "attention", header)
    elif args.what == "paper-loss":
        paper = load_config(REPO / "config" / "config.yaml", REPO / "workflow" / "schemas" / "config.schema.yaml", preset="paper")
        demo_scale = {k: base[k] for k in ("widths", "crop", "deterministic", "device", "amp", "log_every")}
        rows = []
        for form in ("printed", "swapped"):
            setting = {**{k: v for k, v in paper["train"].items() if k != "seeds"}, **demo_scale,
                       "lesion_weight": form, "checkpoint_every": 10**6, **changed}
            jobs = []
            for s in args.seeds:
                jobs += _jobs_for(cfg, splits, args.splits, "unet3d", setting, f"paper-{form}", results, scratch, seed_index=s)
            pool.map(_train_one, jobs)
            done = [j for j in jobs if Path(j["out"]).exists()]  # the others were stopped by on_failure: fail
            scored = pool.map(_score_job, [(j, _files(results, splits[j["split"]]["val"]), cfg["predict"],
                                            {"class weights": form, "split": j["split"], "seed": j["seed"]}) for j in done])
            for j, sc in zip(done, scored):
                v = _health(j["out"])
                rows.append({**sc, "health_score": round(v["score"], 3), "learned": v["learned"], "stopped": ""})
            for j in (j for j in jobs if not Path(j["out"]).exists()):
                message = Path(j["out"] + ".stopped.txt").read_text()
                rows.append({"class weights": form, "split": j["split"], "seed": j["seed"], "sample_dice": float("nan"),
                             "voxel_dice": float("nan"), "health_score": float("nan"), "learned": False,
                             "stopped": message.split(" has not learned: ")[-1].split(";")[0]})
        df = pd.DataFrame(rows)
        df[["sample_dice", "voxel_dice"]] = df[["sample_dice", "voxel_dice"]].mul(100).round(1)
        table = df[["class weights", "split", "seed", "sample_dice", "voxel_dice", "health_score", "learned", "stopped"]].rename(
            columns={"sample_dice": "val sample Dice", "voxel_dice": "val voxel Dice"})
        summary = table.groupby("class weights")["val sample Dice"].agg(["mean", "min", "max"]).round(1)
        header = (
            f"The paper's training settings (config/presets/paper.yaml: {paper['train']['iterations']} iterations, batch "
            f"{paper['train']['batch_size']}, lr {paper['train']['lr']} {paper['train']['lr_schedule']}, Dice term "
            f"{paper['train']['dice_weight']}, dropout {paper['train']['dropout']}, random crops, train.on_failure "
            f"{changed.get('on_failure', paper['train']['on_failure'])}: a training its health check says has not learned "
            f"stops at half-way) at the demo's widths "
            f"{base['widths']} and crop {base['crop']}, 3D U-Net, with the paper's class weights as printed (lesion ~0.27) "
            f"and swapped (lesion ~0.73); validation subjects of splits {args.splits}, seeds {args.seeds}; commit {commit}; "
            f"`python tools/tune_on_validation.py paper-loss --splits {' '.join(map(str, args.splits))} "
            f"--seeds {' '.join(map(str, args.seeds))}{set_note}`\n\n"
            + "\n".join(f"- {form}: validation sample Dice of the trainings that ran to the end: mean {r['mean']}, "
                         f"min {r['min']}, max {r['max']}; "
                         f"{int((~table[table['class weights'] == form].learned).sum())} of "
                         f"{int((table['class weights'] == form).sum())} failed the health check"
                         for form, r in summary.iterrows()) + "\n")
        _write(table, out, "paper-loss", header)
    else:
        jobs = []
        for s in args.seeds:
            jobs += _jobs_for(cfg, splits, [0], "unet3d", base, "s0", results, scratch, seed_index=s)
        pool.map(_train_one, jobs)
        tasks = []
        for j, s in zip(jobs, args.seeds):
            for part in ("val", "test"):
                tasks.append((j, _files(results, splits[0][part]), cfg["predict"], {"seed_index": s, "part": part}))
        df = pd.DataFrame(pool.map(_score_job, tasks))
        table = df.pivot_table(index="seed_index", columns="part", values=["sample_dice", "voxel_dice"]).mul(100).round(2)
        table.columns = [f"{a} {b}" for a, b in table.columns]
        table = table.reset_index()
        spread = {c: (table[c].max() - table[c].min(), statistics.stdev(table[c])) for c in table.columns[1:]}
        header = (f"Seed-to-seed spread of the 3D U-Net on split 0 ({len(args.seeds)} seeds; the only change is "
                  f"the training seed); commit {commit}; `python tools/tune_on_validation.py seeds`\n\n"
                  + "\n".join(f"- {c}: range {r:.2f} points, sd {s:.2f}" for c, (r, s) in spread.items()))
        _write(table, out, "seeds", header)
    pool.close()
    return 0


def _health(model_path: str) -> dict:
    """The health verdict a training recorded with its weights (rsanet.training.health_verdict)."""
    import torch

    return torch.load(model_path, map_location="cpu", weights_only=True)["health"]


def _commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, check=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
