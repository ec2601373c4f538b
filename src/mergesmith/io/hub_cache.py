"""Model references as recipes copied from model cards write them (``org/name``, ``org/name@revision``),
found in the local Hugging Face cache: nothing is downloaded, no network, no ``huggingface_hub`` import.

The cache layout is the hub's: ``<cache>/models--org--name/refs/<revision>`` holds a commit hash and
``snapshots/<hash>/`` the files. ``<cache>`` is ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``,
``$HF_HOME/hub`` or ``~/.cache/huggingface/hub`` (the hub library's order).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def cache_roots() -> list[Path]:
    roots = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]).expanduser())
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    roots.append(Path(home).expanduser() / "hub")
    return roots


def resolve(ref: str) -> Path | None:
    """The cached snapshot folder of repo id ``ref`` (``org/name[@revision]``), or None."""
    if not _REPO_ID.match(ref) or ref.startswith((".", "/", "~")):
        return None
    repo, _, rev = ref.partition("@")
    rev = rev or "main"
    for root in cache_roots():
        folder = root / ("models--" + repo.replace("/", "--"))
        if not folder.is_dir():
            continue
        commit = rev
        ref_file = folder / "refs" / rev
        if ref_file.is_file():
            commit = ref_file.read_text().strip()
        snap = folder / "snapshots" / commit
        if snap.is_dir():
            return snap
    return None


def local_path(ref: str) -> Path:
    """``ref`` as a local path: itself when it exists, else its Hugging Face cache snapshot when there is one."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    return resolve(ref) or path
