"""Snakemake script: the BIDS derivatives' cohort table and figure, and their dataset_description.json
(rsanet-bids' group level)."""
from pathlib import Path

from rsanet.bids_app import group_step
from rsanet.logs import logged

with logged(snakemake.log[0]):
    exports = sorted(p for p in Path(snakemake.input.export).iterdir() if p.is_dir())
    group_step(snakemake.params.bids, Path(snakemake.output.table).parent, exports[0],
               snakemake.params.size_bins_mm3)
