# One training job per (variant, split, seed), then one job predicting the test volumes of its
# split and scoring them (per-subject metrics), so each test volume is loaded once. Job sizes
# come from the config's `resources:` section, never from `params:`, so raising a time limit or
# a thread count does not rerun finished jobs.


rule train:
    input:
        splits="results/splits.json",
        train=split_preprocessed("train"),
        # scored by the health check as fixed patches, never fitted on
        val=split_preprocessed("val"),
    output:
        model="results/models/{variant}/split{split}/seed{seed}/model.pt",
        log_csv="results/models/{variant}/split{split}/seed{seed}/train_log.csv",
        health="results/models/{variant}/split{split}/seed{seed}/health.json",
    log:
        "logs/train/{variant}/split{split}/seed{seed}.log",
    benchmark:
        "results/benchmarks/jobs/train/{variant}/split{split}/seed{seed}.tsv"
    # Trainings before predictions whenever both are ready: every health verdict arrives early,
    # and the study does not end on one training followed by its prediction with a core idle
    # (docs/performance.md, "The end of the run").
    priority: 1
    retries: job_retries()
    conda:
        ENV
    threads: job_resources("train")["threads"]
    resources:
        mem_mb=attempt_scaled("train", "mem_mb"),
        runtime=attempt_scaled("train", "runtime"),
        gpu=job_resources("train")["gpus"],
    params:
        train=train_params(),
        # Not an output: Snakemake would delete it when a job dies; kept for resuming.
        checkpoint="results/models/{variant}/split{split}/seed{seed}/checkpoint.pt",
    script:
        "../../scripts/train.py"


rule predict:
    input:
        model="results/models/{variant}/split{split}/seed{seed}/model.pt",
        splits="results/splits.json",
        test=split_preprocessed("test"),
    output:
        predictions=directory("results/predictions/{variant}/split{split}/seed{seed}"),
        metrics="results/metrics/{variant}/split{split}/seed{seed}.csv",
    log:
        "logs/predict/{variant}/split{split}/seed{seed}.log",
    benchmark:
        "results/benchmarks/jobs/predict/{variant}/split{split}/seed{seed}.tsv"
    retries: job_retries()
    conda:
        ENV
    threads: job_resources("predict")["threads"]
    resources:
        mem_mb=attempt_scaled("predict", "mem_mb"),
        runtime=attempt_scaled("predict", "runtime"),
        gpu=job_resources("predict")["gpus"],
    params:
        predict=section("predict"),
        evaluation=section("evaluation"),
        device=config["train"]["device"],
        part="test",
    script:
        "../../scripts/predict.py"


# The validation part of each split (splits.n_val > 0), predicted under the same policy: the
# scores any setting may be chosen on (`snakemake validation`) and the lesions the per-lesion
# confidence is calibrated on (rule lesion_calibration, before the export).
rule predict_validation:
    input:
        model="results/models/{variant}/split{split}/seed{seed}/model.pt",
        splits="results/splits.json",
        test=split_preprocessed("val"),
    output:
        predictions=directory(
            "results/validation/predictions/{variant}/split{split}/seed{seed}"
        ),
        metrics="results/validation/metrics/{variant}/split{split}/seed{seed}.csv",
    log:
        "logs/predict_validation/{variant}/split{split}/seed{seed}.log",
    benchmark:
        "results/benchmarks/jobs/predict_validation/{variant}/split{split}/seed{seed}.tsv"
    retries: job_retries()
    conda:
        ENV
    threads: job_resources("predict")["threads"]
    resources:
        mem_mb=attempt_scaled("predict", "mem_mb"),
        runtime=attempt_scaled("predict", "runtime"),
        gpu=job_resources("predict")["gpus"],
    params:
        predict=section("predict"),
        evaluation=section("evaluation"),
        device=config["train"]["device"],
        part="val",
    script:
        "../../scripts/predict.py"
