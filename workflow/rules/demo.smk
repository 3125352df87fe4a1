# The embedded demo cohort: each subject synthesised from nilearn's MNI152 template and one of
# the 30 real lesion masks shipped with the package (CC-BY, Lesjak et al. 2018).


rule demo_subject:
    output:
        t1="results/demo/{subject}/T1.nii.gz",
        t2="results/demo/{subject}/T2.nii.gz",
        flair="results/demo/{subject}/FLAIR.nii.gz",
        lesions="results/demo/{subject}/lesions.nii.gz",
        truth="results/demo/{subject}/truth.json",
    log:
        "logs/demo/{subject}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        demo=section("demo"),
    script:
        "../../scripts/demo_subject.py"
