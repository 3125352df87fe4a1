# RSANet study: co-registration -> splits -> 7 variants x N splits training -> evaluation ->
# Table 1, figures and report. See README.md. Stages live in workflow/rules/, one file each.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/coregister.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/benchmark.smk"


localrules:
    all,
    splits,
    aggregate,
    figures,
    provenance,


rule all:
    input:
        all_outputs(),
    default_target: True
