"""Write docs/demo_results.md from a finished demo study's tables, as they came.

    python tools/demo_results.py --results /path/to/clone/results --intro intro.md > docs/demo_results.md

The intro (a Markdown file: what was run, on which commit and machine, how long it took, and
what the reader should make of it) goes first; then, generated from the run's own files: the
findings (``findings.md``), the test sample Dice per split and variant (``per_subject_metrics.csv``), Table 1, the training
health check of every training, the corrected paired tests, Table 2, lesion-wise precision by
ensemble agreement (``lesion_confidence/<variant>.csv``), the calibrated lesion confidence
(``lesion_calibration/<variant>.json``) and where the time went (``job_times.md``,
from every heavy job's Snakemake benchmark file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from rsanet.evaluation import to_markdown
from rsanet.models import VARIANTS


def per_split_dice(per_subject: pd.DataFrame) -> pd.DataFrame:
    """Test sample Dice (%) per split (rows) and variant (columns, in Table 1's order)."""
    table = 100 * per_subject.pivot_table(index="split", columns="variant", values="dice", aggfunc="mean")
    order = [v for v in VARIANTS if v in table.columns]
    table = table[order].round(1)
    table.columns = [VARIANTS[v].display_name for v in order]
    return table.reset_index()


def precision_by_agreement(folder: Path) -> pd.DataFrame:
    """The lesion_confidence rule's tables of every variant (``folder/<variant>.csv``), one block
    of rows per variant in Table 1's order."""
    tables = {p.stem: pd.read_csv(p) for p in folder.glob("*.csv") if not p.stem.endswith("_lesions")}
    order = [v for v in VARIANTS if v in tables]
    table = pd.concat([tables[v] for v in order], ignore_index=True)
    table["variant"] = table.variant.map(lambda v: VARIANTS[v].display_name)
    return table.round({"precision_pct": 1})


def calibration(folder: Path) -> pd.DataFrame:
    """The lesion_calibration rule's records (``folder/<variant>.json``): per variant (Table 1's
    order) and ensemble kind, what it was calibrated on, the cross-validated Brier score on the
    validation lesions, and on the test lesions the ECE of the calibrated probability and of the raw
    agreement, and the Brier score; ``exported kind``: the kind chosen on validation."""
    import json

    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    rows = []
    for v in [v for v in VARIANTS if v in records]:
        r = records[v]
        for kind, e in r["kinds"].items():
            c, t = e["calibration"], e["test"]
            rows.append({"variant": VARIANTS[v].display_name, "ensemble": kind,
                         "chosen": "yes" if kind == r["chosen"] else "",
                         "models": e["models_per_subject"], "validation lesions": c["lesions"],
                         "CV Brier (validation)": c.get("cv_brier"), "test lesions": t["lesions"],
                         "real (%)": t.get("real_pct"), "ECE calibrated": t.get("ece"),
                         "ECE raw agreement": t.get("ece_agreement"), "Brier (test)": t.get("brier")})
    return pd.DataFrame(rows).round(3)


def _demoted(markdown: str) -> str:
    """Every heading one level down (the findings page's '# ' title becomes a section)."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="the study's results/ folder")
    p.add_argument("--intro", required=True, help="Markdown file with the run's description")
    args = p.parse_args(argv)
    tables = Path(args.results) / "tables"
    rows = pd.read_csv(tables / "per_subject_metrics.csv")
    parts = [
        Path(args.intro).read_text().rstrip() + "\n",
        _demoted((tables / "findings.md").read_text()).rstrip() + "\n",
        "## Per split (test sample Dice, %)\n",
        to_markdown(per_split_dice(rows)),
        "## Table 1\n",
        (tables / "table1.md").read_text().rstrip() + "\n",
        "## Did every training learn? (the health check)\n",
        (tables / "training_health.md").read_text().rstrip() + "\n",
        "## Each variant against the 3D U-Net (corrected resampled t-test over splits)\n",
        (tables / "paired_tests.md").read_text().rstrip() + "\n",
        "## Table 2 (lesion-wise and distance metrics)\n",
        (tables / "table2.md").read_text().rstrip() + "\n",
        "## Per-lesion confidence: lesion-wise precision by ensemble agreement\n",
        "Each subject segmented by the ensemble of the models of the splits that test it (rule "
        "`lesion_confidence`, results/tables/lesion_confidence/); a predicted lesion is true when it "
        "overlaps a true lesion.\n",
        to_markdown(precision_by_agreement(tables / "lesion_confidence")),
        "## Per-lesion confidence: calibrated on validation subjects, measured on test subjects\n",
        "Rule `lesion_calibration` (results/tables/lesion_calibration/): each lesion's probability of being "
        "real, a logistic map of its agreement, mean probability and log volume fitted on the lesions of the "
        "subjects in some split's validation part; measured on the subjects in no validation part. Split "
        "ensemble: one model per split that held the subject out; seed ensemble: the seeds of one split "
        "(variants with train.seeds > 1). `chosen`: the kind with the lower cross-validated Brier score on the "
        "validation lesions, which the export takes (docs/inference.md, \"Calibrated lesion confidence\").\n",
        to_markdown(calibration(tables / "lesion_calibration")),
        "## Where the time went (Snakemake benchmark files of the heavy jobs)\n",
        (tables / "job_times.md").read_text().rstrip() + "\n",
    ]
    sys.stdout.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
