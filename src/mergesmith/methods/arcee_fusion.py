"""Arcee Fusion: keep only the base -> model changes that stand out as outliers in importance.

Arcee AI, "Arcee Fusion" (arcee.ai blog, 2025; mergekit `arcee_fusion`). No paper.

With base b, other model m and delta = m - b, per row r (last dim; 0-d/1-D tensors are one row):

    KL_r = sum_j p_j log(p_j / q_j),  p = softmax(m_r) + 1e-8,  q = softmax(b_r) + 1e-8
    importance = |delta| * KL_r                       (KL broadcast over its row)
    threshold  = median + 1.5 * (Q3 - Q1)             (quantiles of importance over the tensor)
    theta      = b + delta * [importance >= threshold]

Quantiles are order statistics sorted[floor(q (n-1))] (mergekit's rule). Tensors with more than
1M elements take them from 1M positions drawn uniformly with replacement from ``ctx.generator(0)``,
so the result is reproducible per (seed, tensor name).

The scores are row-wise, so a big tensor streams in row chunks (``sums``, one phase): each chunk
contributes the sampled scores that fall in its rows (the same positions, drawn from the whole
tensor's generator), the threshold is computed from their union, and the apply recomputes each
chunk's scores. The threshold is the in-memory one exactly.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .base import ChunkParts, register
from .kernels import INLINE_BLOCK, row_ranges

SAMPLE_SIZE = 1_000_000
IQR_FACTOR = 1.5


# Work sizes on the CPU: the softmaxes run on ~1M-element row blocks (a softmax is a parallel region at
# any size, which on a busy 2-core machine costs ~1 ms each), everything else on row blocks below
# torch's parallel grain (kernels.inline_blocks), which run inline with cache-resident temporaries.
SOFTMAX_BLOCK = 1 << 20


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rows (last dim); 0-d/1-D tensors are one row."""
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(m_r) + 1e-8 || softmax(b_r) + 1e-8) of every row r, [rows, 1], in blocks of rows."""
    m, b = _rows(model), _rows(base)
    rows, cols = m.shape
    out = torch.empty(rows, 1, dtype=m.dtype, device=m.device)
    cpu = m.device.type == "cpu"
    for a0, a1 in row_ranges(rows, cols, SOFTMAX_BLOCK) if cpu else [(0, rows)]:
        p = torch.softmax(m[a0:a1], dim=-1)
        q = torch.softmax(b[a0:a1], dim=-1)
        for r0, r1 in row_ranges(a1 - a0, cols, INLINE_BLOCK) if cpu else [(0, a1 - a0)]:
            pb, qb = p[r0:r1].add_(1e-8), q[r0:r1].add_(1e-8)
            torch.sum(torch.div(pb, qb, out=qb).log_().mul_(pb), dim=-1, keepdim=True, out=out[a0 + r0:a0 + r1])
    return out


def importance_scores(model: torch.Tensor, base: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """|m - b| times the row-wise KL(softmax(m) || softmax(b)) (``kl``: :func:`row_kl`, if known)."""
    m, b = _rows(model), _rows(base)
    kl = row_kl(model, base) if kl is None else kl
    out = torch.empty_like(m)
    size = INLINE_BLOCK if m.device.type == "cpu" else m.numel()
    for r0, r1 in row_ranges(m.shape[0], m.shape[1], size):
        torch.sub(m[r0:r1], b[r0:r1], out=out[r0:r1]).abs_().mul_(kl[r0:r1])
    return out.reshape(model.shape)


def keep_outliers(model: torch.Tensor, base: torch.Tensor, kl: torch.Tensor, threshold, inplace: bool) -> torch.Tensor:
    """theta = b + (m - b) [|m - b| KL_r >= threshold], block by block (``inplace``: overwrites ``model``)."""
    out = model if inplace else model.clone()
    m, b = _rows(out), _rows(base)
    size = INLINE_BLOCK if m.device.type == "cpu" else m.numel()
    for r0, r1 in row_ranges(m.shape[0], m.shape[1], size):
        d = m[r0:r1].sub_(b[r0:r1])
        keep = d.abs().mul_(kl[r0:r1]).ge_(threshold)  # the importance scores, then the comparison
        d.mul_(keep).add_(b[r0:r1])
    return out


def sample_positions(n: int, generator: torch.Generator | None, device=None) -> torch.Tensor | None:
    """Flat positions of the quantile sample of an n-element tensor: SAMPLE_SIZE drawn uniformly with
    replacement from ``generator`` when n > SAMPLE_SIZE, else None (every position)."""
    if n <= SAMPLE_SIZE:
        return None
    return torch.randint(n, (SAMPLE_SIZE,), generator=generator, device=device)


def quantile_threshold(sample: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR of the values ``sample`` (order statistics sorted[floor(q (n-1))]), 0-d
    float32. On the CPU the three order statistics come from numpy's O(n) partition (the same
    values as the sort, single-threaded), on a GPU from torch.sort."""
    flat = sample.reshape(-1)
    n = flat.numel()
    ranks = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)]
    if flat.device.type == "cpu":
        part = np.partition(flat.numpy(), ranks)
        q1, med, q3 = (torch.tensor(part[r], dtype=flat.dtype) for r in ranks)
    else:
        s = torch.sort(flat).values
        q1, med, q3 = (s[r] for r in ranks)
    return med + IQR_FACTOR * (q3 - q1)


def _take(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flat[idx] (numpy's single-threaded gather on the CPU)."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.take(flat.numpy(), idx.numpy()))
    return flat[idx]


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5 IQR of ``scores`` (a 1M-element sample with replacement for larger tensors)."""
    flat = scores.reshape(-1)
    idx = sample_positions(flat.numel(), generator, flat.device)
    return quantile_threshold(flat if idx is None else _take(flat, idx))


def _generator(ctx) -> torch.Generator:
    """The sample's generator: ctx.generator(0) of the whole tensor (chunk 0), for every row chunk."""
    return replace(ctx, chunk=0).generator(0)


def _sums(ctx, base, models, p):
    """This row chunk's part of the quantile sample (the sampled positions that fall in its rows; their
    union over the chunks is the whole tensor's sample, in another order, which the quantiles do not
    see) and its rows' KL (kept, so that the apply does not recompute the softmaxes)."""
    kl = row_kl(models[0], base)
    scores = importance_scores(models[0], base, kl).reshape(-1)
    n, lo = scores.numel(), 0
    if ctx.rows is not None and ctx.shape:
        n = 1
        for s in ctx.shape:
            n *= s
        lo = ctx.rows[0] * (scores.numel() // max(1, ctx.rows[1] - ctx.rows[0]))
    idx = sample_positions(n, _generator(ctx) if n > SAMPLE_SIZE else None, scores.device)
    if idx is None:
        part = scores
    elif scores.device.type == "cpu":
        i = idx.numpy() - lo
        i = i[i.view(np.uint64) < scores.numel()]  # lo <= idx < lo + numel in one unsigned compare
        part = torch.from_numpy(np.take(scores.numpy(), i))
    else:
        idx = idx[(idx >= lo) & (idx < lo + scores.numel())]
        part = scores[idx - lo]
    return ChunkParts({ctx.chunk: (part, kl)})


def _finish(step, prev, parts: ChunkParts, p) -> tuple:
    """(threshold, {chunk: its rows' KL})."""
    return quantile_threshold(torch.cat([s for s, _ in parts.ordered()])), {c: kl for c, (_, kl) in parts.items()}


@register(
    "arcee_fusion",
    paper="Arcee AI, Arcee Fusion (2025), mergekit `arcee_fusion`; no paper",
    math="imp = |m - b| * KL(softmax(m_row) || softmax(b_row)); theta = b + (m - b) * [imp >= median + 1.5 IQR]",
    base="required",
    granularity="tensor",
    min_models=1,
    max_models=1,
    mergekit="identical to mergekit `arcee_fusion` (their quantile sample is unseeded; ours uses ctx.generator(0)).",
    notes="parameter-free; the threshold is recomputed per tensor.",
    example={},
    sums=_sums,
    finish_sums=_finish,
)
def arcee_fusion(ctx, base, models, p):
    if ctx.sums is not None:  # a row chunk: threshold and KL from the sums phase
        threshold, kl = ctx.sums[0], ctx.sums[1][ctx.chunk]
    else:
        kl = row_kl(models[0], base)
        scores = importance_scores(models[0], base, kl)
        threshold = outlier_threshold(scores, _generator(ctx) if scores.numel() > SAMPLE_SIZE else None)
        del scores
    return keep_outliers(models[0], base, kl, threshold, inplace=ctx.owned)
