"""Snakemake script: write the seeded random train/test splits."""
from rsanet.logs import logged
from rsanet.steps import splits_step

with logged(snakemake.log[0]):
    p = snakemake.params
    splits_step(p.subjects, snakemake.output[0], p.n_splits, p.n_train, p.n_test, p.seed)
