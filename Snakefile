# The RSANet study workflow lives in workflow/Snakefile (the Snakemake catalogue's layout); this
# file lets `snakemake` run it from the checkout's top level, and `-s path/to/Snakefile` too.
include: "workflow/Snakefile"
