"""Snakemake script: train one variant on one split with one seed (resumes from its checkpoint)."""
from pathlib import Path

from rsanet.logs import log_attempt, logged
from rsanet.stages.train import train_step

with logged(snakemake.log[0]):
    log_attempt("train", snakemake.resources, snakemake.config["resources"])
    train_step(
        variant=snakemake.wildcards.variant,
        split=int(snakemake.wildcards.split),
        splits_json=snakemake.input.splits,
        preprocessed={Path(p).stem: p for p in [*snakemake.input.train, *snakemake.input.val]},
        train_cfg=dict(snakemake.params.train),
        out_model=snakemake.output.model,
        out_log=snakemake.output.log_csv,
        out_health=snakemake.output.health,
        checkpoint=snakemake.params.checkpoint,
        threads=snakemake.threads,
        seed_index=int(snakemake.wildcards.seed),
    )
