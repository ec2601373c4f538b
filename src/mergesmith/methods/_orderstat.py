"""Exact order statistics of a streamed multiset of float32 values (two-pass radix selection).

Whole-model statistics such as PCB's per-task quantiles need the value of a given rank among all
entries of a model without ever holding the model. Each float32 is mapped to a 32-bit key whose
integer order equals the float order (signed values included). Pass 0 histograms the high 16 bits of
every key (and counts the values); the bucket holding each wanted rank is then known. Pass 1
histograms the low 16 bits of the keys inside those buckets only, which pins every wanted rank to an
exact key, hence an exact value: the same number ``torch.sort(all_values)[rank]`` would give.

Partials are sparse (non-zero buckets only) so the engine may hold one per tensor cheaply; state is a
few histograms per wanted rank, independent of model size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_HALF = 16
_BUCKETS = 1 << _HALF
_MASK = _BUCKETS - 1


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) whose order equals the float order of ``x`` (as float32)."""
    b = x.detach().to(torch.float32).contiguous().reshape(-1).view(torch.int32).to(torch.int64)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b) + (1 << 31)


def key_to_float(key: int) -> float:
    b = int(key) - (1 << 31)
    if b < 0:
        b ^= 0x7FFFFFFF
    return torch.tensor([b], dtype=torch.int32).view(torch.float32).item()


def _sparse_bincount(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(v, minlength=_BUCKETS)
    idx = counts.nonzero().reshape(-1)
    return idx.cpu(), counts[idx].cpu()


def _dense(partials) -> torch.Tensor:
    h = torch.zeros(_BUCKETS, dtype=torch.int64)
    for idx, cnt in partials:
        if idx.numel():
            h.index_add_(0, idx, cnt)
    return h


def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bucket holding the ``rank``-th smallest counted value (0-based) and the rank inside it."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=torch.int64), right=True).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, rank - before


@dataclass
class Selection:
    """Selection state for one stream of values: call ``partial`` on each tensor of a pass, then
    ``reduce``; after pass 0 (with the wanted ranks) and pass 1, ``value(rank)`` is exact."""

    level: int = 0
    count: int = 0
    ranks: dict = field(default_factory=dict)  # rank -> (high bucket, residual rank) after pass 0
    values: dict = field(default_factory=dict)  # rank -> float after pass 1

    def partial(self, x: torch.Tensor):
        key = ordered_key(x)
        if self.level == 0:
            return key.numel(), _sparse_bincount(key >> _HALF)
        out = {}
        high = key >> _HALF
        for b in {hb for hb, _ in self.ranks.values()}:
            out[b] = _sparse_bincount(key[high == b] & _MASK)
        return out

    def reduce(self, partials: list, ranks=None) -> "Selection":
        """Pass 0: ``ranks`` is a list of 0-based ranks or a callable ``count -> ranks``."""
        if self.level == 0:
            self.count = sum(n for n, _ in partials)
            want = ranks(self.count) if callable(ranks) else list(ranks or [])
            hist = _dense([h for _, h in partials])
            for r in want:
                if not 0 <= r < self.count:
                    raise ValueError(f"rank {r} outside 0..{self.count - 1}")
                self.ranks[int(r)] = _locate(hist, int(r))
            self.level = 1
            return self
        hists = {b: _dense([p[b] for p in partials if b in p]) for b in {hb for hb, _ in self.ranks.values()}}
        for r, (b, rest) in self.ranks.items():
            low, _ = _locate(hists[b], rest)
            self.values[r] = key_to_float((b << _HALF) | low)
        self.level = 2
        return self

    def value(self, rank: int) -> float:
        return self.values[int(rank)]


def kth_smallest(x: torch.Tensor, rank: int) -> float:
    """In-memory twin of :class:`Selection` for one tensor: the 0-based ``rank``-th smallest value."""
    flat = x.reshape(-1).to(torch.float32)
    return torch.kthvalue(flat, int(rank) + 1).values.item()
