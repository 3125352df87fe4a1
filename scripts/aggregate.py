"""Snakemake script: Table 1, Table 2 and the paired tests from all per-subject metrics."""
from rsanet.logs import logged
from rsanet.stages.report import aggregate_step

with logged(snakemake.log[0]):
    aggregate_step(list(snakemake.input.metrics), list(snakemake.input.health), snakemake.input.splits,
                   dict(snakemake.output))
