"""Write docs/demo_results.md from a finished demo study's tables, as they came.

    python tools/demo_results.py --results /path/to/clone/results --intro intro.md > docs/demo_results.md

The intro (a Markdown file: what was run, on which commit and machine, how long it took, and
what the reader should make of it) goes first; then, generated from the run's own files: the
findings (``findings.md``), the test sample Dice per split and variant (``per_subject_metrics.csv``), Table 1, the training
health check of every training, the corrected paired tests, Table 2, lesion-wise precision by
ensemble agreement (``lesion_confidence/<variant>.csv``) and where the time went (``job_times.md``,
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
        "## Where the time went (Snakemake benchmark files of the heavy jobs)\n",
        (tables / "job_times.md").read_text().rstrip() + "\n",
    ]
    sys.stdout.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
