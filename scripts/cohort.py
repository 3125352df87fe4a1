"""Snakemake script: the segmented new subjects -> one cohort table and its lesion-load figure."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.stages.export import cohort_step

with logged(snakemake.log[0]):
    cohort_step([str(Path(p).parent) for p in snakemake.input.summaries], snakemake.params.size_bins_mm3,
                snakemake.output.csv, snakemake.output.figure,
                snakemake.output.columns)
