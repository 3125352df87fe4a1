"""Give each job on a multi-GPU workstation a GPU of its own.

Snakemake's ``gpu`` resource limits how many GPU jobs run at once but does not say *which*
card a job should use. Under SLURM the scheduler sets ``CUDA_VISIBLE_DEVICES`` for each job;
on a workstation :func:`claim_gpu` does it: it takes an exclusive lock on the first free card
(one lock file per card) and restricts the process to it for as long as the job runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def _visible_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def claim_gpu(lock_dir: str | os.PathLike | None = None, count: int | None = None) -> Iterator[int | None]:
    """Hold one GPU for the duration of the block; yields its index, or ``None``.

    Does nothing (yields ``None``) when ``CUDA_VISIBLE_DEVICES`` is already set (a scheduler
    chose the card) or when fewer than two GPUs are visible. Otherwise it locks
    ``<lock_dir>/rsanet-gpu-<i>.lock`` for the first card ``i`` not locked by another job and sets
    ``CUDA_VISIBLE_DEVICES=i`` before CUDA is initialised. ``count`` overrides the number of cards
    (for tests). Raises ``RuntimeError`` if every card is taken (the ``gpu`` resource limit in the
    profile should prevent that).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        yield None
        return
    n = _visible_count() if count is None else count
    if n < 2:
        yield None
        return
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    for i in range(n):
        fh = open(lock_dir / f"rsanet-gpu-{i}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        os.environ["CUDA_VISIBLE_DEVICES"] = str(i)
        log.info("using GPU %d of %d (CUDA_VISIBLE_DEVICES=%d)", i, n, i)
        try:
            yield i
        finally:
            del os.environ["CUDA_VISIBLE_DEVICES"]
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        return
    raise RuntimeError(
        f"all {n} GPUs are in use by other jobs; set the profile's `gpu` resource limit to at most {n}"
    )
