"""Continual (sequential) merging: models arrive one at a time, memory stays constant in their number.

* :mod:`.opcm` - OPCM's projection and rescaling math (shared with the ``opcm`` merge method);
* :mod:`.baselines` - continual average, continual task arithmetic, continual TIES;
* :mod:`.state` - the state folder (versioned, atomic updates);
* :mod:`.api` - :class:`ContinualMerger` (``init``/``add``/``export``/``status``);
* :mod:`.cli` - ``mergesmith continual init|add|export|status``.

This package imports nothing heavy at import time (the CLI imports it for ``--help``).
"""
from __future__ import annotations

__all__ = ["ContinualMerger"]


def __getattr__(name: str):
    if name == "ContinualMerger":
        from .api import ContinualMerger

        return ContinualMerger
    raise AttributeError(name)
