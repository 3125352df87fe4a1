"""Snakemake script: co-register one subject's contrasts onto the reference contrast, with a QC figure."""
from rsanet.logs import logged
from rsanet.steps import coregister_step

with logged(snakemake.log[0]):
    coregister_step(
        subject=snakemake.wildcards.subject,
        images={"T1": snakemake.input.t1, "T2": snakemake.input.t2, "FLAIR": snakemake.input.flair},
        lesions=snakemake.input.lesions,
        outputs=dict(snakemake.output),
        reference=snakemake.params.reference,
        engine=snakemake.params.engine,
        dof=snakemake.params.dof,
        max_displacement_mm=snakemake.params.max_displacement_mm,
        search_deg=snakemake.params.search_deg,
        finest_level_mm=snakemake.params.finest_level_mm,
        threads=snakemake.threads,
        allow_empty_mask=snakemake.params.allow_empty,
    )
