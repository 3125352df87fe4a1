"""Snakemake script: the per-subject registration QC figure (edges over the reference)."""
from rsanet.logs import logged
from rsanet.steps import registration_qc_step

with logged(snakemake.log[0]):
    registration_qc_step(dict(snakemake.input), snakemake.params.reference, snakemake.output[0])
