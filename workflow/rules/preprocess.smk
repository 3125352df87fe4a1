# RAS reorientation to (D axial, H coronal, W sagittal), brain crop, per-contrast z-scoring;
# saved as uncompressed .npz, which loads fast for random crops.


rule preprocess:
    input:
        t1="results/registered/{subject}/T1.nii.gz",
        t2="results/registered/{subject}/T2.nii.gz",
        flair="results/registered/{subject}/FLAIR.nii.gz",
        lesions="results/registered/{subject}/lesions.nii.gz",
    output:
        "results/preprocessed/{subject}.npz",
    log:
        "logs/preprocess/{subject}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        margin=config["preprocess"]["margin"],
        allow_empty=config["preprocess"]["allow_empty_masks"],
    script:
        "../../scripts/preprocess.py"
