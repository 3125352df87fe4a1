"""Snakemake script: the table of this run's settings against the paper's."""
from rsanet.logs import logged
from rsanet.stages.report import deviations_step

with logged(snakemake.log[0]):
    deviations_step(snakemake.params.config, list(snakemake.input.records), snakemake.output.csv, snakemake.output.md)
