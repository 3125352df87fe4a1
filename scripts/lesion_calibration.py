"""Snakemake script: the calibrated per-lesion probability of one variant, split against seed ensemble."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.export import run_key
from rsanet.stages.export import lesion_calibration_step

with logged(snakemake.log[0]):
    lesion_calibration_step(
        variant=snakemake.wildcards.variant,
        splits_json=snakemake.input.splits,
        test_predictions={run_key(d): d for d in snakemake.input.predictions},
        val_predictions={run_key(d): d for d in snakemake.input.val_predictions},
        preprocessed={Path(p).stem: p for p in snakemake.input.preprocessed},
        segment_options=snakemake.params.segment,
        threshold=snakemake.params.threshold,
        connectivity=snakemake.params.connectivity,
        out_json=snakemake.output.record,
        out_lesions=snakemake.output.lesions,
        out_reliability=snakemake.output.reliability,
        out_figure=str(Path(snakemake.output.figure).with_suffix("")),
    )
