"""Snakemake script: lesion-wise precision by ensemble agreement for one variant."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.export import run_key
from rsanet.stages.export import lesion_confidence_step

with logged(snakemake.log[0]):
    lesion_confidence_step(
        variant=snakemake.wildcards.variant,
        splits_json=snakemake.input.splits,
        predictions={run_key(d): d for d in snakemake.input.predictions},
        preprocessed={Path(p).stem: p for p in snakemake.input.preprocessed},
        segment_options=snakemake.params.segment,
        threshold=snakemake.params.threshold,
        connectivity=snakemake.params.connectivity,
        out_lesions=snakemake.output.lesions,
        out_table=snakemake.output.table,
    )
