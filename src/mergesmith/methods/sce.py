"""SCE (Select, Calculate, Erase): variance-selected, energy-weighted, sign-consensus task vectors.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), Sec. "SCE"; the authors'
reference implementation is mergekit `sce`.

Per tensor, with tau_i = theta_i - theta_0:

1. Select: if select_topk < 1, keep the k = int(|select_topk| * #{var != 0}) positions of largest
   variance across models, var = Var_i(tau_i) (population variance), and zero the rest in every tau_i.
2. Calculate: eta_i = |tau_i|^2 / sum_j |tau_j|^2  (uniform when every tau is 0).
3. Erase: elected sign s = sgn(sum_i tau_i) (0 counts as +); m_i = [sgn(tau_i) == s] (zeros never match).
4. theta = theta_0 + sum_i m_i eta_i tau_i / sum_i m_i eta_i   (divisor 1 where it is 0; ``normalize``)
   or theta_0 + sum_i m_i eta_i tau_i with ``normalize: false``.

The variance is mergekit's (``torch.var``, reproduced bit for bit by ``kernels.variance``). The k-th
largest variance is selected exactly by two-level radix selection (``_radix``), so a big tensor streams
in row chunks (``sums``, three phases: high-bucket histogram, low histogram inside the threshold's
bucket, energies |tau_i|^2; then the apply). **Ties** at the k-th largest value: all positions above it
are kept, and of those equal to it, the ones with the lowest flat (row-major) indices, so exactly k
positions are kept. mergekit's ``torch.topk`` keeps an arbitrary subset of the ties instead (bf16
checkpoints have many ties). The in-memory path runs the same phases on the whole tensor (one chunk),
so both paths keep the same positions.

With one model the variance is 0 everywhere, so select_topk < 1 keeps nothing (theta = theta_0), as in
mergekit. The paper's default tau% is not verified here; mergekit's default 1.0 (no selection) is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _radix as R
from .base import ChunkParts, Param, register
from .kernels import INLINE_BLOCK, disjoint_merge_list, elect_sign_list, inline_blocks, sum_squares, variance


BLOCK = INLINE_BLOCK  # SCE works through a tensor (or an engine row chunk) in flat blocks (kernels.inline_blocks)


@dataclass
class TopVariance:
    """Which positions the select step keeps: the ``k`` largest variances; of the ties at the k-th
    largest (key ``key``), the first ``need`` in flat order. Built in two phases (see module doc)."""

    k: int
    bucket: int = 0  # after the "high" phase: radix bucket of the k-th largest key ...
    rest: int = 0  # ... and its rank inside the bucket (ascending, 1-based)
    key: int = -1  # after the "low" phase: the k-th largest key
    need: int = 0  # how many of the positions equal to it are kept
    before: dict = field(default_factory=dict)  # engine chunk -> positions equal to it in the chunks before

    def mask(self, keys: torch.Tensor, chunk: int, seen: int) -> tuple[torch.Tensor, int]:
        """(float 0/1 keep mask, ties in it) of one block of a chunk's flat variance keys, ``seen``:
        the ties in the chunk's blocks before this one."""
        if self.k == 0:
            return torch.zeros_like(keys, dtype=torch.float32), 0
        keep = keys > self.key
        tie = keys == self.key
        ties = int(tie.sum())
        allow = min(max(self.need - self.before.get(chunk, 0) - seen, 0), ties)
        if allow == ties:
            keep |= tie
        elif allow > 0:
            keep[tie.nonzero().reshape(-1)[:allow]] = True
        return keep.to(torch.float32), ties


@dataclass
class SceSums:
    """Per-tensor result of the sums phases: the selection (None: no selection) and |tau_i|^2."""

    select: TopVariance | None
    energy: torch.Tensor  # float64 [N]

    def eta(self) -> list[float]:
        total = float(self.energy.sum())
        n = self.energy.numel()
        return [float(e) / total for e in self.energy] if total > 0 else [1.0 / n] * n


class _Chunk:
    """A row chunk (or the whole tensor), flat, visited in blocks: the variance keys (formed once,
    from the inputs) and, block by block, the task vectors, masked to the selection (formed in place
    once: owned inputs are overwritten, others copied first)."""

    def __init__(self, ctx, base, models, select: bool):
        self.base = base.reshape(-1)
        self.work = [m.reshape(-1) if ctx.owned else m.reshape(-1).clone() for m in models]
        self.select, self.chunk, self.shape = select, ctx.chunk, base.shape
        self.n = self.base.numel()
        self._keys = None
        self.done = 0  # the task vectors are formed (and masked) in the blocks before this element
        self.seen = 0  # ties at the selection threshold in those blocks

    def blocks(self):
        """(start, end) of the flat blocks, in order."""
        return inline_blocks(self.n, self.base.device, BLOCK)

    def keys(self) -> torch.Tensor:
        """int32 keys (``_radix.keys``) of the flat variance across the task vectors."""
        if self._keys is None:
            self._keys = R.keys(variance(self.work, self.base), nonneg=True)
        return self._keys

    def taus(self, a: int, e: int, sel: TopVariance | None) -> list[torch.Tensor]:
        """One block of the tau_i, zeroed outside the selection ``sel`` (when selecting). Blocks are
        formed in order (the ties to keep are counted along the flat order)."""
        ts = [w[a:e] for w in self.work]
        if a >= self.done:
            keep = None
            if self.select:  # keys from the inputs, before they change
                keep, ties = sel.mask(self.keys()[a:e], self.chunk, self.seen)
                self.seen += ties
            for t in ts:
                t.sub_(self.base[a:e])
                if keep is not None:
                    t.mul_(keep)
            self.done = e
        return ts


def _phases(p) -> tuple[str, ...]:
    return ("high", "low", "energy") if p["select_topk"] < 1 else ("energy",)


def _collect(phase: str, c: _Chunk, state):
    """One chunk's part of a sums phase (additive over chunks)."""
    if phase == "high":  # histogram of the high key bits, and the count of non-zero variances
        k = c.keys()  # sparse, kept per chunk (ChunkParts): cheaper to add than dense 64K histograms
        return ChunkParts({c.chunk: (R.high_hist(k, nonneg=True), int(torch.count_nonzero(k)))})
    if phase == "low":  # per chunk: histogram of the low key bits inside the threshold's bucket
        return ChunkParts({c.chunk: R.low_hist(c.keys(), state.bucket) if state.k > 0 else None})
    out = torch.zeros(len(c.work), dtype=torch.float64)
    for a, e in c.blocks():
        out += sum_squares(c.taus(a, e, state))
    return out


def _finish(step: int, prev, total, p):
    phase = _phases(p)[step]
    if phase == "high":
        hist = R.dense([h for h, _ in total.values()])
        n, nonzero = int(hist.sum()), sum(nz for _, nz in total.values())
        k = int(abs(p["select_topk"]) * nonzero)
        if k == 0:
            return TopVariance(0)
        bucket, rest = R.locate(hist, n - k + 1)  # the k-th largest = the (n-k+1)-th smallest
        return TopVariance(k, bucket, rest)
    if phase == "low":
        return _finish_low(prev, total)
    return SceSums(prev, total)


def _finish_low(sel: TopVariance, parts: ChunkParts) -> TopVariance:
    """The exact threshold key, how many of its ties are kept, and the ties before each chunk."""
    if sel.k == 0:
        return sel
    low, rank = R.locate(R.dense(parts.values()), sel.rest)
    key = ((sel.bucket - R._OFFSET) << 16) | low
    before, seen = {}, 0
    for chunk in sorted(parts):  # flat order
        idx, cnt = parts[chunk]
        hit = (idx == low).nonzero().reshape(-1)
        before[chunk] = seen
        seen += int(cnt[hit[0]]) if hit.numel() else 0
    # the tied keys hold ascending ranks below+1 .. below+seen; ours is below+rank: keep it and those above
    return TopVariance(sel.k, sel.bucket, sel.rest, key, seen - rank + 1, before)


def _merge(c: _Chunk, state: SceSums, normalize: bool) -> torch.Tensor:
    """theta_0 + the sign-consensus, eta-weighted merge of the masked task vectors, block by block
    (the result overwrites the first input's storage)."""
    eta = state.eta()
    agg = "weighted_mean" if normalize else "sum"
    for a, e in c.blocks():
        ts = c.taus(a, e, state.select)
        sign = elect_sign_list(ts, "mass").add_(0.5).sign_()  # sgn(sum_i tau_i), 0 -> +1
        merged = disjoint_merge_list([t.mul_(w) for t, w in zip(ts, eta)], sign, agg, weights=eta)
        ts[0].copy_(merged.add_(c.base[a:e]))
    return c.work[0].reshape(c.shape)


def _sums(ctx, base, models, p):
    return _collect(_phases(p)[ctx.phase], _Chunk(ctx, base, models, p["select_topk"] < 1), ctx.sums)


@register(
    "sce",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models (arXiv 2408.07990), SCE merging",
    math="tau_i masked to the top-variance positions; eta_i ∝ |tau_i|^2; "
    "theta = theta_0 + sum_i m_i eta_i tau_i / sum_i m_i eta_i, m_i = [sgn tau_i = sgn sum_j tau_j]",
    base="required",
    granularity="tensor",
    params=(
        Param("select_topk", float, 1.0, help="fraction of highest-variance positions kept (1 = no selection)"),
        Param("normalize", bool, True, help="divide by the summed weights of the agreeing models"),
        Param("int8_mask", bool, False, help="accepted for mergekit recipes; no effect (masks are bool here)"),
    ),
    min_models=1,
    mergekit="identical to mergekit `sce` (normalize: true), except which of the positions tied at the "
    "top-k variance threshold are kept (ours: the lowest indices; mergekit's topk: arbitrary).",
    notes="weights are computed from the task vectors, not configured.",
    example={"select_topk": 0.5},
    sums=_sums,
    sum_phases=lambda p: len(_phases(p)),
    finish_sums=_finish,
)
def sce(ctx, base, models, p):
    c = _Chunk(ctx, base, models, p["select_topk"] < 1)
    state = ctx.sums
    if state is None:  # the whole tensor: the same phases as over the engine's row chunks
        for step, phase in enumerate(_phases(p)):
            state = _finish(step, state, _collect(phase, c, state), p)
    return _merge(c, state, p["normalize"])
