"""Snakemake script: per-subject metrics of one (variant, split)."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.steps import evaluate_step

with logged(snakemake.log[0]):
    evaluate_step(
        snakemake.wildcards.variant,
        int(snakemake.wildcards.split),
        snakemake.input.splits,
        snakemake.input.predictions,
        {Path(p).stem: p for p in snakemake.input.test},
        snakemake.output[0],
    )
