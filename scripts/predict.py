"""Snakemake script: predict and score the test (or validation) volumes of one split with one trained model."""
from pathlib import Path

from rsanet.logs import log_attempt, logged
from rsanet.stages.train import predict_step

with logged(snakemake.log[0]):
    log_attempt("predict", snakemake.resources, snakemake.config["resources"])
    policy = snakemake.params.predict
    predict_step(
        model_path=snakemake.input.model,
        split=int(snakemake.wildcards.split),
        splits_json=snakemake.input.splits,
        preprocessed={Path(p).stem: p for p in snakemake.input.test},
        out_dir=snakemake.output.predictions,
        out_csv=snakemake.output.metrics,
        predict=dict(policy),
        threads=snakemake.threads,
        device=snakemake.params.device,
        memory_limit_mb=snakemake.resources.mem_mb,
        part=snakemake.params.part,
        seed=int(snakemake.wildcards.seed),
        save_probabilities=policy["save_probabilities"],
        evaluation=dict(snakemake.params.evaluation),
    )
