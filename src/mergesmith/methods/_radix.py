"""Exact order statistics of float32 values by two-level radix selection, in memory or streamed.

Each float32 maps to an int32 key whose integer order is the float order: the IEEE-754 bit pattern
for x >= +0 (``kernels.float_bits``), the pattern with its 31 low bits flipped for negatives (so
-0.0 sorts just below +0.0). The k-th smallest value follows from two histograms: of the high 16 key
bits (which bucket holds rank k), then of the low 16 bits inside that bucket (which exact key). The
result is an element of the input, equal to ``torch.kthvalue(x.flatten(), k)`` (ties between -0.0 and
+0.0 resolve to the smaller key). Histograms are summed over tensors, so a whole model is selected
while streaming: ``Selection`` (state: counts + a few histograms per wanted rank), or the helpers
directly (``_gta_stats``). On large tensors this is ~2x faster than ``torch.kthvalue``. All int32:
no int64 key tensor is ever built. Ranks are 1-based, as in ``torch.kthvalue``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BUCKETS = 1 << 16  # size of both histograms (high and low half-word)
_OFFSET = 1 << 15  # high half-words of signed keys lie in [-2**15, 2**15): shifted to [0, 2**16)


def keys(x: torch.Tensor, nonneg: bool = False) -> torch.Tensor:
    """Flat int32 keys of ``x`` (as float32), monotone in the value. ``nonneg=True`` promises
    x >= +0 everywhere (e.g. ``abs()``): the bit pattern is then already the key (skips 3 passes)."""
    b = x.detach().to(torch.float32).contiguous().reshape(-1).view(torch.int32)
    if nonneg:
        return b
    k = b >> 31  # -1 for negatives, 0 otherwise
    k &= 0x7FFFFFFF
    k ^= b
    return k


def key_value(bucket: int, low: int) -> float:
    """The float whose key has high-bucket index ``bucket`` and low half-word ``low``."""
    k = ((bucket - _OFFSET) << 16) | low
    if k < 0:
        k ^= 0x7FFFFFFF
    return torch.tensor([k], dtype=torch.int32).view(torch.float32).item()


def _host(t: torch.Tensor) -> bool:
    """Histogram on the host with numpy (CPU tensors); GPU tensors stay in torch."""
    return t.device.type == "cpu"


def sparse_hist(v: torch.Tensor, size: int = BUCKETS) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket ids int64, counts int64) of the non-empty buckets of integers ``v`` in [0, size), on the CPU.

    CPU tensors go through numpy's single-threaded bincount: on a busy 2-core machine it was 2-10x
    faster than torch.bincount + nonzero (which pay thread start-up on every call)."""
    if _host(v):
        c = np.bincount(v.reshape(-1).numpy(), minlength=size)
        idx = np.flatnonzero(c)
        return torch.from_numpy(idx.astype(np.int64, copy=False)), torch.from_numpy(c[idx].astype(np.int64, copy=False))
    if v.numel() < size // 8:  # small inputs: sort-based, avoids a dense histogram per call
        idx, cnt = torch.unique(v, return_counts=True)
        return idx.to(torch.int64).cpu(), cnt.to(torch.int64).cpu()
    cnt = torch.bincount(v.reshape(-1), minlength=size)
    idx = cnt.nonzero().reshape(-1)
    return idx.cpu(), cnt[idx].cpu()


def high_hist(k: torch.Tensor, nonneg: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse histogram of the high-bucket index of keys ``k`` (``nonneg`` as in :func:`keys`)."""
    h = torch.from_numpy(k.reshape(-1).numpy() >> 16) if _host(k) else k >> 16  # host: single-threaded numpy
    if nonneg:  # h in [0, 2**15): histogram it unshifted, shift the (few) bucket ids instead
        idx, cnt = sparse_hist(h, _OFFSET)
        return idx + _OFFSET, cnt
    h += _OFFSET
    return sparse_hist(h)


def low_hist(k: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse histogram of the low half-words of the keys in high bucket ``bucket``."""
    if _host(k):
        kn = k.reshape(-1).numpy()
        return sparse_hist(torch.from_numpy(kn[(kn >> 16) == bucket - _OFFSET] & 0xFFFF))
    return sparse_hist(k[(k >> 16) == bucket - _OFFSET] & 0xFFFF)


def window_hist(k: torch.Tensor, lo_key: int, hi_key: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
    """(number of keys < ``lo_key``, sparse histogram of ``key - lo_key`` for keys in [lo_key, hi_key)).
    Keys must be non-negative (``keys(x, nonneg=True)``), so ``key - lo_key`` cannot overflow."""
    width = hi_key - lo_key
    if _host(k):
        d = k.reshape(-1).numpy() - np.int32(lo_key)  # a copy: k may be the caller's
        below = int(np.count_nonzero(d < 0))
        inside = np.compress(d.view(np.uint32) < np.uint32(width), d)  # 0 <= d < width: one unsigned compare
        return below, sparse_hist(torch.from_numpy(inside), width)
    below = int(torch.count_nonzero(k < lo_key))
    d = k - lo_key
    return below, sparse_hist(d[(d >= 0) & (d < width)], width)


def window_part(v: np.ndarray, lo_key: int, hi_key: int) -> tuple[int, np.ndarray]:
    """One block's share of :func:`window_hist` for float32 values ``v >= +0``: (count of keys below
    ``lo_key``, the keys in [lo_key, hi_key) minus ``lo_key``, int32)."""
    d = v.view(np.int32) - np.int32(lo_key)  # non-negative keys: no overflow
    return int(np.count_nonzero(d < 0)), np.compress(d.view(np.uint32) < np.uint32(hi_key - lo_key), d)


def window_merge(parts: list[tuple[int, np.ndarray]], lo_key: int, hi_key: int):
    """:func:`window_hist`'s result from the blocks' :func:`window_part` results (in any order)."""
    from . import _fused

    below = sum(b for b, _ in parts)
    inside = np.concatenate([x for _, x in parts]) if parts else np.empty(0, np.int32)
    if _fused.enabled(inside.size):
        return below, _fused.sparse_counts(inside, hi_key - lo_key)
    return below, sparse_hist(torch.from_numpy(inside), hi_key - lo_key)


def abs_window_hist(x: torch.Tensor, lo_key: int, hi_key: int):
    """:func:`window_hist` of ``keys(x.abs_(), nonneg=True)`` (``x`` is overwritten with |x|). On the CPU
    block by block over the kernel threads (cache-resident temporaries; one histogram at the end)."""
    if not _host(x) or x.dtype != torch.float32 or not x.is_contiguous():
        return window_hist(keys(x.abs_(), nonneg=True), lo_key, hi_key)
    from ._sampling import BLOCK, run_blocks

    xf = x.view(-1).numpy()
    parts: dict[int, tuple[int, np.ndarray]] = {}

    def work(a: int, b: int) -> None:
        parts[a] = window_part(np.abs(xf[a:b], out=xf[a:b]), lo_key, hi_key)

    run_blocks(xf.size, BLOCK, work)
    return window_merge(list(parts.values()), lo_key, hi_key)


def dense(parts, size: int = BUCKETS) -> torch.Tensor:
    """Sum sparse histograms (None entries skipped; dense int64 tensors too) into one dense int64 histogram."""
    h = torch.zeros(size, dtype=torch.int64)
    for part in parts:
        if isinstance(part, torch.Tensor):
            h += part
        elif part is not None and part[0].numel():
            h.index_add_(0, part[0], part[1])
    return h


def locate(hist, rank: int) -> tuple[int, int]:
    """(bucket holding the ``rank``-th smallest counted value, rank inside that bucket), 1-based.
    ``hist`` is a dense histogram or a sparse (ids, counts) pair."""
    idx, cnt = (None, hist) if isinstance(hist, torch.Tensor) else hist
    cum = torch.cumsum(cnt.to("cpu", torch.int64), 0)
    if not 1 <= rank <= (int(cum[-1]) if cum.numel() else 0):
        raise ValueError(f"rank {rank} outside 1..{int(cum[-1]) if cum.numel() else 0}")
    j = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64)).item())
    before = int(cum[j - 1].item()) if j > 0 else 0
    return (j if idx is None else int(idx[j])), rank - before


def kth_smallest(x: torch.Tensor, rank: int, nonneg: bool = False) -> float:
    """The ``rank``-th smallest (1-based) entry of ``x``: equals ``torch.kthvalue(x.flatten(), rank)``."""
    k = keys(x, nonneg)
    b, rest = locate(high_hist(k, nonneg), int(rank))
    low, _ = locate(low_hist(k, b), rest)
    return key_value(b, low)


@dataclass
class Selection:
    """Streamed selection of several ranks over all values of many tensors (two passes).

    Per pass, call ``partial`` on every tensor, then ``reduce`` with the partials; pass 0's ``reduce``
    takes the wanted 1-based ranks (a list, or a callable ``count -> ranks``). After pass 1,
    ``value(rank)`` is exact. ``nonneg`` as in :func:`keys`.
    """

    nonneg: bool = False
    level: int = 0
    count: int = 0
    ranks: dict = field(default_factory=dict)  # rank -> (high bucket, rank inside it) after pass 0
    values: dict = field(default_factory=dict)  # rank -> float after pass 1

    def partial(self, x: torch.Tensor):
        k = keys(x, self.nonneg)
        if self.level == 0:
            return k.numel(), high_hist(k, self.nonneg)
        return {b: low_hist(k, b) for b in {hb for hb, _ in self.ranks.values()}}

    def reduce(self, partials: list, ranks=None) -> "Selection":
        if self.level == 0:
            self.count = sum(n for n, _ in partials)
            want = ranks(self.count) if callable(ranks) else list(ranks or [])
            hist = dense([h for _, h in partials])
            self.ranks = {int(r): locate(hist, int(r)) for r in want}
            self.level = 1
            return self
        for b in {hb for hb, _ in self.ranks.values()}:
            hist = dense([p.get(b) for p in partials])
            for r, (hb, rest) in self.ranks.items():
                if hb == b:
                    self.values[r] = key_value(b, locate(hist, rest)[0])
        self.level = 2
        return self

    def value(self, rank: int) -> float:
        return self.values[int(rank)]
