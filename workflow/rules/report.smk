# Tables, figures and the record of what produced them; `snakemake --report` gathers them.


rule aggregate:
    input:
        metrics=metric_csvs(),
        health=health_files(),
        splits="results/splits.json",
    output:
        per_subject="results/tables/per_subject_metrics.csv",
        health_csv=report(
            "results/tables/training_health.csv",
            caption="../report/training_health.rst",
            category="Tables",
        ),
        health_md="results/tables/training_health.md",
        table1_csv=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Tables",
        ),
        table1_md="results/tables/table1.md",
        table1_tex="results/tables/table1.tex",
        table2_csv=report(
            "results/tables/table2.csv",
            caption="../report/table2.rst",
            category="Tables",
        ),
        table2_md="results/tables/table2.md",
        tests_csv=report(
            "results/tables/paired_tests.csv",
            caption="../report/paired_tests.rst",
            category="Tables",
        ),
        tests_md="results/tables/paired_tests.md",
        size_csv=report(
            "results/tables/detection_by_size.csv",
            caption="../report/detection_by_size.rst",
            category="Tables",
        ),
        size_md="results/tables/detection_by_size.md",
        findings_md="results/tables/findings.md",
        findings_html=report(
            "results/tables/findings.html",
            caption="../report/findings.rst",
            category="Findings",
        ),
    log:
        "logs/aggregate.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../../scripts/aggregate.py"


# Where the time went: every heavy job's Snakemake benchmark file, summed per stage.
rule job_times:
    input:
        coregister=job_benchmarks("coregister"),
        train=job_benchmarks("train"),
        predict=job_benchmarks("predict"),
    output:
        csv=report(
            "results/tables/job_times.csv",
            caption="../report/job_times.rst",
            category="Tables",
        ),
        md="results/tables/job_times.md",
    log:
        "logs/job_times.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../../scripts/job_times.py"


rule figures:
    input:
        per_subject="results/tables/per_subject_metrics.csv",
        splits="results/splits.json",
        logs=train_logs(),
        health=health_files(),
        predictions=fig5_predictions(),
        preprocessed=list(preprocessed_all().values()),
    output:
        fig1=report(
            "results/figures/fig1.png",
            caption="../report/fig1.rst",
            category="Figures",
        ),
        fig5=report(
            "results/figures/fig5.png",
            caption="../report/fig5.rst",
            category="Figures",
        ),
        curves=report(
            "results/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
        ),
        scores=report(
            "results/figures/score_distributions.png",
            caption="../report/score_distributions.rst",
            category="Figures",
        ),
        by_size=report(
            "results/figures/detection_by_size.png",
            caption="../report/detection_by_size.rst",
            category="Figures",
        ),
        load=report(
            "results/figures/lesion_load.png",
            caption="../report/lesion_load.rst",
            category="Figures",
        ),
        pdfs=[
            "results/figures/detection_by_size.pdf",
            "results/figures/lesion_load.pdf",
            "results/figures/fig1.pdf",
            "results/figures/fig5.pdf",
            "results/figures/training_curves.pdf",
            "results/figures/score_distributions.pdf",
        ],
    log:
        "logs/figures.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        runs=RUNS,
        fig5_variants=fig5_variants(),
        subjects=SUBJECTS,
    script:
        "../../scripts/figures.py"


rule deviations:
    input:
        records=expand(
            "results/registered/{subject}/registration.json", subject=SUBJECTS
        ),
    output:
        csv=report(
            "results/tables/deviations.csv",
            caption="../report/deviations.rst",
            category="Tables",
        ),
        md="results/tables/deviations.md",
    log:
        "logs/deviations.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=2,
    params:
        config=study_config(),
    script:
        "../../scripts/deviations.py"


rule validation:
    input:
        metrics=validation_metric_csvs(),
    output:
        csv="results/validation/table1_validation.csv",
        md="results/validation/table1_validation.md",
    log:
        "logs/validation.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../../scripts/validation.py"


rule provenance:
    input:
        table="results/tables/table1.csv",
        records=expand(
            "results/registered/{subject}/registration.json", subject=SUBJECTS
        ),
    output:
        "results/provenance.json",
    log:
        "logs/provenance.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=2,
    params:
        config=study_config(),
    script:
        "../../scripts/provenance.py"
