"""Atomic output folders: everything is written into a temporary folder beside the target and renamed
at the end, so an interrupted or failed run leaves no partial output."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..methods.base import MergeError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early when ``out`` cannot be written: a file, a non-empty folder without overwrite, or a
    missing parent folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output folder {out} is not empty; pass --overwrite to replace it")
    if not out.parent.exists():
        raise MergeError(f"parent folder of {out} does not exist")


def check_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Fail before any weight is read when the disk of ``folder`` has less than ``nbytes`` free (a 7B merge
    writes ~14 GB: running out of space half-way would waste the whole run)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # a file system that does not say (some FUSE mounts): nothing to check against
        return
    if free < nbytes:
        raise MergeError(f"not enough disk space for {what}: it writes {nbytes / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB free on the disk of {folder}")


def replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out`` (replacing it when ``overwrite``)."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise MergeError(f"output folder {out} appeared during the run; pass --overwrite")
        trash = out.parent / f".{out.name}.mergesmith-old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextmanager
def staging(out: str | Path, overwrite: bool = False, check: bool = True):
    """Yield a fresh temporary folder beside ``out``; on success it replaces ``out``, on any error it
    is removed and the error propagates."""
    out = Path(out).resolve()
    if check:
        check_output_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.mergesmith-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
