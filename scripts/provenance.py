"""Snakemake script: record what produced the results (versions, commit, config, device, engines)."""
from rsanet.logs import logged
from rsanet.stages.report import provenance_step

with logged(snakemake.log[0]):
    provenance_step(dict(snakemake.params.config), list(snakemake.input.records), snakemake.output[0])
