"""Snakemake script: predict and score the whole test volumes of one split with one trained variant."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.steps import predict_step

with logged(snakemake.log[0]):
    predict_step(
        model_path=snakemake.input.model,
        split=int(snakemake.wildcards.split),
        splits_json=snakemake.input.splits,
        preprocessed={Path(p).stem: p for p in snakemake.input.test},
        out_dir=snakemake.output.predictions,
        out_csv=snakemake.output.metrics,
        tile=snakemake.params.tile,
        overlap=snakemake.params.overlap,
        threads=snakemake.threads,
        device=snakemake.params.device,
    )
