"""Send a step's logging to its Snakemake log file, including the error that stopped it."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator


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
