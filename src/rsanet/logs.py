"""Send a step's logging to its Snakemake log file, including the error that stopped it."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator, Mapping


@contextlib.contextmanager
def logged(log_path: str | None, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Log to ``log_path`` (and stderr) for the duration of the block.

    An exception escaping the block is written to the log with its traceback, then re-raised so
    the job fails; the first line of the message is what Snakemake shows the user.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(True)
    try:
        yield logging.getLogger("rsanet")
    except Exception:
        logging.getLogger("rsanet").exception("step failed")
        raise
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def log_attempt(stage: str, resources: object, sizes: Mapping) -> int:
    """Log the job's size and attempt; on the last attempt, what to set if it dies again.

    ``stage``: the ``resources:`` key of the rule (``train`` or ``predict``); ``resources``: the
    job's (Snakemake's ``snakemake.resources``: ``mem_mb`` in MB, ``runtime`` in minutes, both
    already multiplied by the attempt number); ``sizes``: the config's ``resources:`` section.
    Returns the attempt number (1 = first).
    """
    log = logging.getLogger("rsanet")
    base = sizes[stage]
    mem_mb, runtime = (resources[k] if isinstance(resources, Mapping) else getattr(resources, k)
                       for k in ("mem_mb", "runtime"))
    attempt = max(1, round(float(mem_mb) / float(base["mem_mb"])))
    last = int(sizes.get("retries", 0)) + 1
    log.info("job size: %s MB, %s min (attempt %d of at most %d; resources.%s x the attempt)",
             mem_mb, runtime, attempt, last, stage)
    if attempt >= last and last > 1:
        log.warning("last attempt: if this job is killed again for memory or time, raise resources.%s.mem_mb "
                    "(now %s MB at the first attempt) or resources.%s.runtime (%s min), or resources.retries (%d)",
                    stage, base["mem_mb"], stage, base["runtime"], last - 1)
    return attempt
