"""The per-tensor TIES trim (``scope: tensor``) from two histogram passes: over the row chunks of a tensor too
big to hold whole, or over a tensor held whole as one chunk (mergekit's exact top-k, :func:`select`).

Both per-tensor rules keep the largest |tau_i| of the tensor, by model: the official code keeps
|tau_i| >= the (n - floor(k n))-th smallest |tau_i| (:func:`official_rank`; ``_gta.tensor_threshold`` for a
tensor held whole); mergekit's exact top-k (``exact_topk``) keeps the k = max(1, floor(k n)) largest and, of the
entries tied at the k-th largest value, those with the lowest flat indices (``kernels.topk_mask``). The engine
streams such a tensor in two sums phases over its row chunks (``MethodSpec.sums``), then the apply chunks:

* ``high``: per model, the histogram of the high 16 bits of the |tau_i| keys (``_radix``);
* ``low``: per model, the histogram of the low 16 bits inside the bucket holding the wanted rank, kept per
  chunk, which gives the exact threshold value and, for the exact top-k, how many of its ties each chunk
  holds, so an apply chunk knows how many of its own ties to keep (the first ones, in flat order).

Only for pipelines whose trim is the first step (no sparsifier before it) and without l1/l2 rescaling or a
per-tensor majority sign (those need the whole tensor: it is then held whole, as before).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _radix as R
from .base import ChunkParts


@dataclass
class ModelTrim:
    """One model's selection: ``rank`` (1-based, among the smallest |tau|) of the threshold value; after
    ``high`` its ``bucket`` and ``rest``; after ``low`` the ``value`` and, for the exact top-k, ``need``
    (ties at it to keep) and ``before`` ({chunk: ties in the chunks before it})."""

    rank: int
    exact: bool
    numel: int = 0
    k: int = 0
    bucket: int = 0
    rest: int = 0
    value: float = 0.0
    low: int = 0
    need: int = 0
    before: dict = field(default_factory=dict)

    def threshold(self) -> float:
        """The block trim's bound (it keeps |tau| >= it): the value itself (official rule), or the next float
        above it (exact top-k: its kept ties are patched in by index)."""
        return above(self.value) if self.exact else self.value


def above(value: float) -> float:
    """The next float32 above ``value``: a trim that keeps |tau| >= it keeps |tau| > ``value``."""
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(float("inf"))))


def needs_selection(d: float) -> bool:
    """A trim density that needs a threshold (0 and 1 are handled without one)."""
    return 0.0 < d < 1.0


def official_rank(n: int, density: float) -> int:
    """1-based rank r such that keeping |x| >= (r-th smallest |x|) is the official TIES trim.

    The official code keeps ``|x| >= kthvalue(n - floor(k n))``, i.e. floor(k n) + 1 entries when there
    are no ties (the paper says "top k%"; we follow the code). 0 means keep everything.
    """
    return n - int(density * n)


def selections(numel: int, densities, exact: bool) -> list[ModelTrim | None]:
    """Per model: its selection, or None (density 0 or 1, or the official rule keeping everything)."""
    out = []
    for d in densities:
        d = float(d)
        if not needs_selection(d):
            out.append(None)
        elif exact:
            k = max(1, int(d * numel))
            out.append(ModelTrim(numel - k + 1, True, numel, k))
        else:
            r = official_rank(numel, d)
            out.append(ModelTrim(r, False) if r > 0 else None)
    return out


def abs_keys(t: torch.Tensor) -> torch.Tensor:
    """int32 keys of |t| (float32)."""
    return R.keys(t.to(torch.float32).abs(), nonneg=True)


def collect(phase: int, chunk: int, taus, densities, sel: list | None) -> ChunkParts:
    """One chunk's part of phase ``phase`` (0: high histograms, 1: low histograms in the found buckets), per
    model (None where nothing is selected)."""
    parts = []
    for i, (t, d) in enumerate(zip(taus, densities)):
        if not needs_selection(float(d)) or (phase == 1 and sel[i] is None):
            parts.append(None)
            continue
        k = abs_keys(t)
        parts.append(R.high_hist(k, nonneg=True) if phase == 0 else R.low_hist(k, sel[i].bucket))
    return ChunkParts({chunk: parts})


class Trims(list):
    """The selections of a tensor's models (None where nothing is selected), as ``ctx.sums``."""


def finish(phase: int, sel: list | None, total: ChunkParts, densities, exact: bool) -> list:
    """The selections after phase ``phase`` from the chunks' parts (phase 0 makes them: the tensor's size is
    the count of its keys)."""
    chunks = sorted(total)
    hists = [None if all(total[c][i] is None for c in chunks) else R.dense([total[c][i] for c in chunks])
             for i in range(len(densities))]
    if phase == 0:
        numel = next(int(h.sum()) for h in hists if h is not None)
        sel = Trims(selections(numel, densities, exact))
    for i, s in enumerate(sel):
        if s is None:
            continue
        hist = hists[i]
        if phase == 0:
            s.bucket, s.rest = R.locate(hist, s.rank)
            continue
        s.low, _ = R.locate(hist, s.rest)
        s.value = R.key_value(s.bucket, s.low)
        if s.exact:
            at_most = s.rank - s.rest + int(hist[: s.low + 1].sum())  # keys <= the value
            s.need = s.k - (s.numel - at_most)  # the ties to keep: k minus the keys above the value
            seen = 0
            for c in chunks:  # ties at the value per chunk, in flat order
                s.before[c] = seen
                idx, cnt = total[c][i]
                hit = (idx == s.low).nonzero().reshape(-1)
                seen += int(cnt[hit[0]]) if hit.numel() else 0
    return sel


def chunk_ties(taus, sel: list, chunk: int) -> tuple[list, list]:
    """(per model: the block trim's bound or None, the flat indices in this chunk of the ties at the value
    that the exact top-k keeps, or None) for an apply chunk."""
    bounds, ties = [], []
    for t, s in zip(taus, sel):
        bounds.append(None if s is None else s.threshold())
        quota = 0 if s is None or not s.exact or s.value <= 0 else s.need - s.before.get(chunk, 0)
        if quota <= 0:
            ties.append(None)
            continue
        tie = (t.reshape(-1).to(torch.float32).abs() == s.value).nonzero().reshape(-1)[:quota]
        ties.append(tie)
    return bounds, ties


def select(taus, densities, exact: bool) -> Trims:
    """The selections of a tensor held whole: the same two phases, on the tensor as one chunk (chunk 0)."""
    sel = finish(0, None, collect(0, 0, taus, densities, None), densities, exact)
    return finish(1, sel, collect(1, 0, taus, densities, sel), densities, exact)
