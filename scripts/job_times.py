"""Snakemake script: the heavy jobs' benchmark files -> one time table per stage."""
from rsanet.logs import logged
from rsanet.stages.report import job_times_step

with logged(snakemake.log[0]):
    job_times_step({stage: list(snakemake.input[stage]) for stage in ("coregister", "train", "predict")},
                   snakemake.output.csv, snakemake.output.md)
