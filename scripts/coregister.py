"""Snakemake script: co-register one subject's contrasts onto the reference contrast, with a QC figure."""
from rsanet.logs import logged
from rsanet.registration import CoregistrationSettings
from rsanet.stages.coregister import coregister_step

with logged(snakemake.log[0]):
    coregister_step(
        subject=snakemake.wildcards.subject,
        images={"T1": snakemake.input.t1, "T2": snakemake.input.t2, "FLAIR": snakemake.input.flair},
        lesions=snakemake.input.lesions,
        outputs=dict(snakemake.output),
        settings=CoregistrationSettings.from_config(snakemake.params.registration),
        threads=snakemake.threads,
        allow_empty_mask=snakemake.params.allow_empty,
    )
