# Five (configurable) seeded random train/validation/test splits, written as one JSON file: the
# list drawn once in common.smk (SPLITS), so input functions and jobs use the same splits.


rule splits:
    input:
        "results/qc/input_checks.tsv",
    output:
        "results/splits.json",
    log:
        "logs/splits.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=2,
    params:
        splits=SPLITS,
        seed=config["splits"]["seed"],
    script:
        "../../scripts/splits.py"
