#!/usr/bin/env python
"""Attention cost (RSA against non-local) and speed of every variant.

Snakemake script of rule ``benchmark`` (workflow/rules/benchmark.smk), or standalone::

    python scripts/benchmark.py --out results/benchmarks [--config config/config.yaml]
        [--threads 2] [--rounds 7] [--variants unet3d rsa-111] [--no-extras]
        [--omp-wait-policy PASSIVE]

Writes ``attention_cost.csv``, ``networks.csv``, ``benchmark.md``, ``attention_cost.png`` (+ .pdf)
and ``benchmark.json`` into the output folder. Widths, crop, batch and threads come from the
config's ``train:`` section. Run it on an otherwise idle machine: it times things.
"""


import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep at once instead of spinning, unless the environment says otherwise
# (read by libgomp when torch loads, so set before any import of torch). On a machine shared
# with other jobs spinning threads steal the cores the working ones need and the timings become
# erratic (3x slower, see the benchmark's "OpenMP wait policy" section); on an idle machine
# spinning is 10-20% faster for this network. --omp-wait-policy overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv=None) -> int:
    import yaml

    from rsanet.benchmark import Outputs, run_benchmark

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"), help="output folder")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--threads", type=int, default=None, help="default: the config's resources.train.threads")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of the training steps")
    p.add_argument("--variants", nargs="*", default=None, help="default: the config's variants")
    p.add_argument("--memory-budget-mib", type=float, default=1500, help="skip measurements needing more")
    p.add_argument("--no-extras", action="store_true", help="skip the layout and OpenMP comparisons")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default=None,
                   help="OMP_WAIT_POLICY for this run (default: the environment's, else PASSIVE; "
                        "'default': libgomp's own), see docs/performance.md")
    args = p.parse_args(argv)
    if args.omp_wait_policy == "default":  # before torch is imported (libgomp reads it at load)
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    cfg = yaml.safe_load(Path(args.config).read_text())
    train = cfg.get("train", {})
    run_benchmark(
        Outputs.in_folder(args.out),
        widths=train.get("widths", (8, 16, 32, 64)),
        crop=train.get("crop", (16, 64, 64)),
        batch=int(train.get("batch_size", 2)),
        threads=args.threads or int(cfg.get("resources", {}).get("train", {}).get("threads", 2)),
        device=train.get("device", "auto"),
        rounds=args.rounds,
        variants=args.variants or cfg.get("variants"),
        memory_budget_mib=args.memory_budget_mib,
        extras=not args.no_extras,
    )
    return 0


def snakemake_main(smk) -> None:
    from rsanet.benchmark import Outputs, run_benchmark
    from rsanet.logs import logged

    train = dict(smk.params.train)
    out = Outputs(
        attention_csv=Path(smk.output.attention), networks_csv=Path(smk.output.networks),
        markdown=Path(smk.output.table), figure=Path(smk.output.figure), json=Path(smk.output.json),
    )
    with logged(smk.log[0]):
        import logging

        log = logging.getLogger("rsanet.benchmark").info
        run_benchmark(
            out,
            widths=train.get("widths", (8, 16, 32, 64)),
            crop=train.get("crop", (16, 64, 64)),
            batch=int(train.get("batch_size", 2)),
            threads=smk.threads,
            device=train.get("device", "auto"),
            rounds=int(smk.params.rounds),
            variants=list(smk.params.variants),
            memory_budget_mib=float(smk.params.memory_budget_mib),
            log=log,
        )


if __name__ == "__main__":
    if "snakemake" in globals():
        snakemake_main(snakemake)  # noqa: F821
    else:
        sys.exit(main())
