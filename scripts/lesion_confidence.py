"""Snakemake script: lesion-wise precision by ensemble agreement for one variant."""
import re
from pathlib import Path

from rsanet.logs import logged
from rsanet.stages.export import lesion_confidence_step

with logged(snakemake.log[0]):
    predictions = {}
    for folder in snakemake.input.predictions:  # results/predictions/<variant>/split<k>/seed<s>
        split, seed = (int(re.fullmatch(r"[a-z]+(\d+)", part).group(1)) for part in Path(folder).parts[-2:])
        predictions[(split, seed)] = folder
    lesion_confidence_step(
        variant=snakemake.wildcards.variant,
        splits_json=snakemake.input.splits,
        predictions=predictions,
        preprocessed={Path(p).stem: p for p in snakemake.input.preprocessed},
        segment_options=snakemake.params.segment,
        threshold=snakemake.params.threshold,
        connectivity=snakemake.params.connectivity,
        out_lesions=snakemake.output.lesions,
        out_table=snakemake.output.table,
    )
