"""Where the real open_ms_data files are (``../shared/data/open_ms_data`` beside the repository).

Tests on real scans need them; CI always has them (CI=true then fails instead of skipping).
Set ``RSANET_OPEN_MS_DATA`` to use another copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPEN_MS_DATA = Path(os.environ.get("RSANET_OPEN_MS_DATA", ROOT.parent / "shared" / "data" / "open_ms_data"))
MNI_PATIENTS = ("patient07", "patient19", "patient26")


def open_ms_data() -> Path:
    """The data folder; skips (fails on CI) when it is not there."""
    if not (OPEN_MS_DATA / "patients_mni").is_dir():
        message = f"real data not found at {OPEN_MS_DATA} (set RSANET_OPEN_MS_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return OPEN_MS_DATA
