"""Snakemake script: export the best (or the configured) variant's models with a model card."""
from collections import defaultdict
from pathlib import Path

from rsanet.logs import logged
from rsanet.export import export_step

with logged(snakemake.log[0]):
    models = defaultdict(list)
    for path in snakemake.input.models:
        models[Path(path).parts[-4]].append(path)  # results/models/<variant>/split<k>/seed<s>/model.pt
    export_step(
        choice=snakemake.params.choice,
        table1_csv=snakemake.input.table1,
        table2_csv=snakemake.input.table2,
        models=dict(models),
        config=snakemake.params.config,
        subjects=snakemake.params.subjects,
        out_dir=snakemake.output[0],
        health=snakemake.input.health,
        confidence={Path(p).stem: p for p in snakemake.input.confidence},
        calibration={Path(p).stem: p for p in snakemake.input.calibration},
        registration_records=list(snakemake.input.records),
        preprocessed=list(snakemake.input.preprocessed),
    )
