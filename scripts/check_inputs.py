"""Snakemake script: check every subject's files and write one report of all problems."""
from rsanet.logs import logged
from rsanet.checks import check_cohort

with logged(snakemake.log[0]):
    check_cohort(
        snakemake.params.subjects,
        snakemake.output.report,
        reference=snakemake.params.reference,
        allow_empty_masks=snakemake.params.allow_empty,
    )
