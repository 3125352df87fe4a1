# The RSANet study workflow lives in workflow/Snakefile (the Snakemake catalogue's layout); this
# file lets `snakemake` run it from the checkout's top level, and `-s path/to/Snakefile` too.
include: "workflow/Snakefile"


# An `include:` keeps the including file's default target: the same outputs as workflow/Snakefile's `all`.
localrules:
    study,


rule study:
    default_target: True
    input:
        rules.all.input,
