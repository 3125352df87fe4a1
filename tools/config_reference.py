"""Print the Markdown reference of every config key, generated from the schema (-> config/README.md)."""
from pathlib import Path

import yaml

from rsanet.checks import config_reference

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    print(config_reference(yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())), end="")
