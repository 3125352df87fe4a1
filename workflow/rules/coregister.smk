# Linear co-registration of the other contrasts onto the reference (FLAIR by default):
# FSL FLIRT where installed, SimpleITK otherwise; the engine is recorded next to the outputs.


rule coregister:
    input:
        unpack(raw_images),
        validated="results/qc/input_checks.tsv",
    output:
        t1="results/registered/{subject}/T1.nii.gz",
        t2="results/registered/{subject}/T2.nii.gz",
        flair="results/registered/{subject}/FLAIR.nii.gz",
        lesions="results/registered/{subject}/lesions.nii.gz",
        transforms=directory("results/registered/{subject}/transforms"),
        record="results/registered/{subject}/registration.json",
        qc=report(
            "results/qc/registration/{subject}.png",
            caption="../report/registration_qc.rst",
            category="Registration QC",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/coregister/{subject}.log",
    benchmark:
        "results/benchmarks/jobs/coregister/{subject}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        registration=section("registration"),
        allow_empty=config["preprocess"]["allow_empty_masks"],
    script:
        "../../scripts/coregister.py"


rule registration_accuracy:
    input:
        records=expand(
            "results/registered/{subject}/registration.json", subject=SUBJECTS
        ),
        truths=expand("results/demo/{subject}/truth.json", subject=SUBJECTS),
        flairs=expand("results/registered/{subject}/FLAIR.nii.gz", subject=SUBJECTS),
    output:
        csv="results/qc/registration_accuracy.csv",
        figure=report(
            "results/figures/registration_accuracy.png",
            caption="../report/registration_accuracy.rst",
            category="Registration QC",
        ),
    log:
        "logs/registration_accuracy.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/registration_accuracy.py"
