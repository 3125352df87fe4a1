"""Snakemake script: Table 1 on the validation parts of the splits (what settings are chosen on)."""
from rsanet.logs import logged
from rsanet.stages.report import validation_step

with logged(snakemake.log[0]):
    validation_step(list(snakemake.input.metrics), snakemake.output.csv, snakemake.output.md)
