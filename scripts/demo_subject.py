"""Snakemake script: synthesise one subject of the embedded demo cohort."""
from rsanet.logs import logged
from rsanet.stages.demo import demo_subject_step

with logged(snakemake.log[0]):
    demo_subject_step(snakemake.wildcards.subject, snakemake.params.demo, dict(snakemake.output))
