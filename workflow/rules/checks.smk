# Every subject's files opened and checked before any work starts; one report lists every problem.


rule check_inputs:
    input:
        all_raw_files(),
    output:
        report="results/qc/input_checks.tsv",
    log:
        "logs/check_inputs.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        subjects=lambda wildcards: {
            s: {"T1": r.t1, "T2": r.t2, "FLAIR": r.flair, "lesion mask": r.lesions}
            for s, r in SHEET.iterrows()
        },
        reference=REFERENCE,
        allow_empty=config["preprocess"]["allow_empty_masks"],
    script:
        "../../scripts/check_inputs.py"
