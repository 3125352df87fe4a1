# RSANet study: co-registration -> splits -> 7 variants x N splits training -> evaluation ->
# Table 1, figures and report. See README.md. Stages live in workflow/rules/, one file each.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The default config, found next to this Snakefile (so `-s path/to/Snakefile` works from any
# folder, and as a module); a user's --configfile overrides only the keys it sets, and the
# schema (workflow/schemas/config.schema.yaml) fills in anything still missing.
configfile: Path(workflow.basedir) / "config" / "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/checks.smk"
include: "workflow/rules/coregister.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/network_costs.smk"


localrules:
    all,
    splits,
    aggregate,
    figures,
    provenance,
    export,


rule all:
    default_target: True
    input:
        all_outputs(),
