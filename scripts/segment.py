"""Snakemake script: segment one new subject with the exported model (rsanet-segment's steps)."""
from pathlib import Path

from rsanet.logs import log_attempt, logged
from rsanet.segment import segment

with logged(snakemake.log[0]):
    log_attempt("predict", snakemake.resources, snakemake.config["resources"])
    exports = sorted(p for p in Path(snakemake.input.export).iterdir() if p.is_dir())
    o = snakemake.params.options
    segment(exports[0], snakemake.input.t1, snakemake.input.t2, snakemake.input.flair,
            Path(snakemake.output.summary).parent,
            device="auto", min_lesion_mm3=o["min_lesion_mm3"], tta=o["tta"],
            threads=snakemake.threads)
