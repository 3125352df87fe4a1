"""Suite-wide test settings.

Every test starts from the same random state (torch, NumPy's legacy global generator, Python's
``random``), so no test depends on an unseeded input: a tolerance that holds for one draw and
fails for another on a different CPU's kernels is a failing test. Tests that need their own
stream still seed their own generators.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
