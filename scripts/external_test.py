"""Snakemake script: score the new subjects that have a lesion mask (an external test set)."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.stages.export import external_test_step

with logged(snakemake.log[0]):
    external_test_step(dict(snakemake.params.masks), [str(Path(f).parent) for f in snakemake.input.segmented], dict(snakemake.params.evaluation),
                       snakemake.output.csv, snakemake.output.md)
