"""Reusable tensor memory for the streaming loop (reads and fused outputs).

A streamed merge allocates the same few sizes over and over (a 4M-element chunk per input, one output
chunk). Fresh large allocations come from the kernel as untouched pages: every 4 KB costs a page fault
and a zero-fill on first write (~1.3 M faults, several CPU seconds, for a 0.5B TIES merge). This pool
hands out flat byte buffers and takes them back on its own once nothing references them any more:
a buffer is free when the pool holds the only reference to it (tensors made by :func:`empty` keep a
reference through their numpy base until their storage dies, views included).

Bounded: at most ``POOL_BYTES`` are kept, buffers below ``MIN_BYTES`` are never pooled (plain
``torch.empty``). Contents of a reused buffer are stale, as with ``torch.empty``.
"""
from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

POOL_BYTES = 160 << 20  # kept at most (idle buffers count in the resident set)
MIN_BYTES = 1 << 20  # smaller requests are not pooled
MAX_BYTES = 32 << 20  # nor larger ones (whole embeddings): rare, and they would pin a lot

_LOCK = threading.Lock()
_BUFS: list[np.ndarray] = []
_IDLE_REFS = 2  # references of an idle buffer seen in _take: the list and getrefcount's argument


def _take(nbytes: int) -> np.ndarray | None:
    with _LOCK:
        pick, idle = -1, []
        for k in range(len(_BUFS)):  # no local name for the buffers: it would count as a reference
            if sys.getrefcount(_BUFS[k]) <= _IDLE_REFS:
                idle.append(k)
                size = _BUFS[k].nbytes
                if size >= nbytes and (pick < 0 or size < _BUFS[pick].nbytes):
                    pick = k
        if pick >= 0:
            return _BUFS[pick][:nbytes]
        held = sum(b.nbytes for b in _BUFS)
        for k in sorted(idle, key=lambda k: _BUFS[k].nbytes):  # make room: drop idle buffers, smallest first
            if held + nbytes <= POOL_BYTES:
                break
            held -= _BUFS[k].nbytes
            _BUFS[k] = None  # type: ignore[call-overload]
        _BUFS[:] = [b for b in _BUFS if b is not None]
        if held + nbytes > POOL_BYTES:
            return None
        buf = np.empty(nbytes, np.uint8)
        _BUFS.append(buf)
        return buf[:nbytes]


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, from the pool when the size suits it."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not MIN_BYTES <= nbytes <= MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    buf = _take(nbytes)
    if buf is None:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(buf).view(dtype).reshape(shape)


def held_bytes() -> int:
    """Bytes the pool keeps (idle or in use)."""
    with _LOCK:
        return sum(b.nbytes for b in _BUFS)
