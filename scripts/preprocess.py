"""Snakemake script: reorient, crop to the brain and normalise one co-registered subject."""
from rsanet.logs import logged
from rsanet.stages.preprocess import preprocess_step

with logged(snakemake.log[0]):
    preprocess_step(
        snakemake.wildcards.subject,
        {"T1": snakemake.input.t1, "T2": snakemake.input.t2, "FLAIR": snakemake.input.flair},
        snakemake.input.lesions,
        snakemake.output[0],
        margin=snakemake.params.margin,
        allow_empty_mask=snakemake.params.allow_empty,
    )
