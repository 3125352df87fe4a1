"""Snakemake script: one BIDS subject/session segmented into the derivatives (rsanet-bids' participant level)."""
from pathlib import Path

from rsanet.bids_app import segment_case
from rsanet.logs import log_attempt, logged

with logged(snakemake.log[0]):
    log_attempt("predict", snakemake.resources, snakemake.config["resources"])
    exports = sorted(p for p in Path(snakemake.input.export).iterdir() if p.is_dir())
    o = snakemake.params.options
    # the derivatives' root: above anat/ and the case's folder (sub-<s> or sub-<s>/ses-<t>)
    root = Path(snakemake.output.prob).parents[2 + snakemake.wildcards.bids_folder.count("/")]
    segment_case(dict(snakemake.params.case), snakemake.params.bids, root, exports[0],
                 device="auto", threads=snakemake.threads, tta=o["tta"], min_lesion_mm3=o["min_lesion_mm3"])
