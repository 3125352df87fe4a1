"""Snakemake script: write the seeded random train/validation/test splits the workflow planned with."""
from rsanet.logs import logged
from rsanet.stages.splits import splits_step

with logged(snakemake.log[0]):
    splits_step(snakemake.params.splits, snakemake.output[0], snakemake.params.seed)
