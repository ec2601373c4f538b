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
"""
from __future__ import annotations

import torch

from .base import register

SAMPLE_SIZE = 1_000_000
IQR_FACTOR = 1.5


def importance_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|m - b| times the row-wise KL(softmax(m) || softmax(b))."""
    m = model.reshape(1, 1) if model.dim() == 0 else model
    b = base.reshape(1, 1) if base.dim() == 0 else base
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return ((m - b).abs() * kl).reshape(model.shape)


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """median + 1.5 IQR of ``scores`` (a 1M-element sample with replacement for larger tensors)."""
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        idx = torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=generator, device=flat.device)
        flat = flat[idx]
    s = torch.sort(flat).values
    n = s.numel()
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return med + IQR_FACTOR * (q3 - q1)


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
)
def arcee_fusion(ctx, base, models, p):
    delta = models[0] - base
    scores = importance_scores(models[0], base)
    gen = ctx.generator(0) if scores.numel() > SAMPLE_SIZE else None
    mask = scores >= outlier_threshold(scores, gen)
    return base + delta * mask
