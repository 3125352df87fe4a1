# Five (configurable) seeded random train/test splits, written as one JSON file.


rule splits:
    input:
        "results/qc/input_validation.tsv",
    output:
        "results/splits.json",
    params:
        subjects=SUBJECTS,
        n_splits=config["splits"]["n_splits"],
        n_train=config["splits"]["n_train"],
        n_test=config["splits"].get("n_test"),
        seed=config["splits"].get("seed", 0),
    log:
        "logs/splits.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=2,
    conda:
        ENV
    script:
        "../../scripts/splits.py"
