"""Snakemake script of rule ``benchmark``: attention cost and speed of every variant.

Run by hand without Snakemake: ``python tools/benchmark.py`` (same measurements).
"""

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads; see tools/benchmark.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from rsanet.benchmarks.run import Outputs, run_benchmark  # noqa: E402
from rsanet.logs import logged  # noqa: E402

train = dict(snakemake.params.train)
out = Outputs(
    attention_csv=Path(snakemake.output.attention), networks_csv=Path(snakemake.output.networks),
    markdown=Path(snakemake.output.table), figure=Path(snakemake.output.figure), json=Path(snakemake.output.json),
)
with logged(snakemake.log[0]):
    run_benchmark(
        out, widths=train["widths"], crop=train["crop"], batch=int(train["batch_size"]), threads=snakemake.threads,
        device=train["device"], rounds=int(snakemake.params.rounds), variants=list(snakemake.params.variants),
        memory_budget_mib=float(snakemake.params.memory_budget_mib),
        log=logging.getLogger("rsanet.benchmarks").info,
    )
