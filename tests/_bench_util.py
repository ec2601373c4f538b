"""Tiny zoos for the bench tests, built once per test session into a temporary cache folder."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_ROOT: Path | None = None
_ZOOS: dict = {}


def cache_root() -> Path:
    """The temporary MERGESMITH_CACHE of this test session (removed at exit)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="mergesmith-bench-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tiny_zoo(name: str):
    """The tiny variant of zoo family ``name``, built once (cached in :func:`cache_root`)."""
    if name not in _ZOOS:
        from mergesmith.bench.zoo import get_zoo

        old = os.environ.get("MERGESMITH_CACHE")
        os.environ["MERGESMITH_CACHE"] = str(cache_root())
        try:
            _ZOOS[name] = get_zoo(name, size="tiny")
        finally:
            if old is None:
                del os.environ["MERGESMITH_CACHE"]
            else:
                os.environ["MERGESMITH_CACHE"] = old
    return _ZOOS[name]
