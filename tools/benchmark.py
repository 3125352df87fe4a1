#!/usr/bin/env python
"""Attention cost (RSA against non-local) and speed of every variant, run by hand.

The same measurements as ``snakemake network_costs`` (rule ``network_costs``), without Snakemake::

    python tools/benchmark.py --out results/benchmarks [--config config/config.yaml] [--preset paper]
        [--threads 2] [--rounds 7] [--variants unet3d rsa-111] [--no-extras]
        [--omp-wait-policy PASSIVE]

Writes ``attention_cost.csv``, ``networks.csv``, ``benchmark.md``, ``attention_cost.png`` (+ .pdf)
and ``benchmark.json`` into the output folder. Widths, crop, batch and device come from the
config's ``train:`` section (layered over the schema's defaults). Run it on an otherwise idle
machine: it times things.
"""

import argparse
import os
from pathlib import Path

# Idle OpenMP threads sleep at once instead of spinning, unless the environment says otherwise
# (read by libgomp when torch loads, so set before any import of torch). On a machine shared
# with other jobs spinning threads steal the cores the working ones need and the timings become
# erratic (3x slower, see docs/performance.md, "OpenMP wait policy"); on an idle machine
# spinning is 10-20% faster for this network. --omp-wait-policy overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"), help="output folder")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--preset", default=None, help="the preset under --config (default: the config's own)")
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

    from rsanet.benchmarks.run import Outputs, run_benchmark
    from rsanet.checks import load_config

    cfg = load_config(args.config, REPO / "workflow" / "schemas" / "config.schema.yaml", args.preset)
    train = cfg["train"]
    run_benchmark(
        Outputs.in_folder(args.out),
        widths=train["widths"],
        crop=train["crop"],
        batch=int(train["batch_size"]),
        threads=args.threads or int(cfg["resources"]["train"]["threads"]),
        device=train["device"],
        rounds=args.rounds,
        variants=args.variants or cfg["variants"],
        memory_budget_mib=args.memory_budget_mib,
        extras=not args.no_extras,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
