"""Snakemake script: registration error against the demo cohort's known transforms."""
from rsanet.logs import logged
from rsanet.stages.coregister import registration_accuracy_step

with logged(snakemake.log[0]):
    registration_accuracy_step(
        list(snakemake.input.records), list(snakemake.input.truths), list(snakemake.input.flairs),
        snakemake.output.csv, snakemake.output.figure,
    )
