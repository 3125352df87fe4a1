"""Writing results: the one atomic-write helper, and the library versions recorded with them.

Every output of the project is written through :func:`staged`: into temporary paths beside the
final ones, moved into place only when the whole block succeeded (a crash never leaves a
half-written file that a later step would trust), with the permissions the user's umask gives a
newly created file or folder (``0o644``/``0o755`` under umask ``0022``, ``0o664``/``0o775`` under
``0002``), as if it had been written directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

#: The libraries whose versions are recorded with results (provenance.json, summary.json).
LIBRARIES: tuple[str, ...] = ("torch", "numpy", "scipy", "nibabel", "SimpleITK", "fslpy", "nilearn", "pandas",
                              "matplotlib", "snakemake")


def library_versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each package (``None`` where it is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged(paths: Sequence[str | os.PathLike], folders: bool = False) -> Iterator[list[Path]]:
    """Yield temporary paths (same folder, same suffixes: writers that infer the format from the
    extension behave the same) for ``paths``; move them all into place only if the block
    succeeds, so a failure leaves none of the outputs behind, and nothing half-written.

    ``folders``: the paths are folders (created empty; an existing one is replaced as a whole).
    Files get mode ``0o666 & ~umask``, folders ``0o777 & ~umask``: what ``open()`` and
    ``mkdir()`` would have given them (``tempfile`` creates them private, ``0o600``/``0o700``).
    """
    final = [Path(p) for p in paths]
    mode = (0o777 if folders else 0o666) & ~umask()
    temps: list[Path] = []
    try:
        for p in final:
            p.parent.mkdir(parents=True, exist_ok=True)
            if folders:
                temps.append(Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent)))
            else:
                fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix="".join(p.suffixes), dir=p.parent)
                os.close(fd)
                temps.append(Path(tmp))
        yield temps
        for tmp, p in zip(temps, final):
            os.chmod(tmp, mode)
            if folders and p.exists():
                shutil.rmtree(p)
            os.replace(tmp, p)
    finally:
        for tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
