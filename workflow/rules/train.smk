# One training job per (variant, split), then one job predicting its whole test volumes and
# scoring them (per-subject metrics), so each test volume is loaded once.


rule train:
    input:
        splits="results/splits.json",
        train=split_train_preprocessed,
    output:
        model="results/models/{variant}/split{split}/model.pt",
        log_csv="results/models/{variant}/split{split}/train_log.csv",
    params:
        train=config["train"],
        # Not an output: Snakemake would delete it when a job dies; kept for resuming.
        checkpoint="results/models/{variant}/split{split}/checkpoint.pt",
    log:
        "logs/train/{variant}/split{split}.log",
    threads: config["train"].get("threads", 2)
    resources:
        mem_mb=config["train"].get("mem_mb", 4000),
        runtime=config["train"].get("runtime", 60),
        gpu=config["train"].get("gpus", 1),
    conda:
        ENV
    script:
        "../../scripts/train.py"


rule predict:
    input:
        model="results/models/{variant}/split{split}/model.pt",
        splits="results/splits.json",
        test=split_test_preprocessed,
    output:
        predictions=directory("results/predictions/{variant}/split{split}"),
        metrics="results/metrics/{variant}/split{split}.csv",
    params:
        tile=config["predict"].get("tile"),
        overlap=config["predict"].get("overlap", 0.5),
        device=config["train"].get("device", "auto"),
    log:
        "logs/predict/{variant}/split{split}.log",
    threads: config["predict"].get("threads", 2)
    resources:
        mem_mb=config["predict"].get("mem_mb", 4000),
        runtime=config["predict"].get("runtime", 30),
        gpu=config["train"].get("gpus", 1),
    conda:
        ENV
    script:
        "../../scripts/predict.py"
