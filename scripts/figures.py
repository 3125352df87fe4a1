"""Snakemake script: Fig. 1, Fig. 5, training curves and score distributions."""
from pathlib import Path

from rsanet.logs import logged
from rsanet.stages.report import figures_step

with logged(snakemake.log[0]):
    p = snakemake.params
    logs = dict(zip([tuple(run) for run in p.runs], snakemake.input.logs))
    figures_step(
        per_subject_csv=snakemake.input.per_subject,
        train_logs=logs,
        splits_json=snakemake.input.splits,
        preprocessed={Path(f).stem: f for f in snakemake.input.preprocessed},
        predictions=dict(zip(p.fig5_variants, snakemake.input.predictions)),
        health_jsons=list(snakemake.input.health),
        stems={k: str(Path(getattr(snakemake.output, k)).with_suffix("")) for k in ("fig1", "fig5", "curves", "scores", "by_size", "load")},
    )
