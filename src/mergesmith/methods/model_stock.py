"""Model Stock: interpolate the average of a few fine-tuned models towards the pre-trained anchor.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv 2403.19522).

Per tensor (the paper's "layer-wise"; per row with ``filter_wise``), with offsets delta_i = theta_i - theta_0
of the N >= 2 fine-tuned models and cos(phi) their pairwise cosine similarity:

    t = N cos(phi) / (1 + (N-1) cos(phi)),     theta = t * mean_i(theta_i) + (1 - t) * theta_0

The paper assumes one common angle for N > 2 models. ``cos_mode: cosine`` (default, mergekit) takes
the mean of the pairwise cosines; ``angle`` takes the cosine of the mean pairwise angle (FusionBench).
Each cosine uses max(|d_i||d_j|, 1e-6) as denominator (a frozen tensor gives cos = 0 -> the anchor)
and is clamped to [-1, 1]. The paper's derivation needs 0 <= t <= 1; cos <= 0 gives t <= 0, so t is
clamped to [0, 1] (``clamp: true``); mergekit does not clamp (``clamp: false``). When
|1 + (N-1) cos| < 1e-6 the anchor is kept (t = 0), as mergekit 0.1.5 does.
Per tensor the cosines come from the Gram matrix of the offsets (float64), which adds up over row
chunks, so big tensors stream (``sums``); ``filter_wise`` is per row and chunks directly.
"""
from __future__ import annotations

import torch

from .base import Param, register
from .kernels import gram, inline_blocks


def interpolation_ratio(cos: torch.Tensor, n: int, clamp: bool) -> torch.Tensor:
    """t = N cos / (1 + (N-1) cos), 0 where the denominator vanishes, optionally clamped to [0, 1]."""
    den = 1.0 + (n - 1) * cos
    bad = den.abs() < 1e-6
    t = torch.where(bad, torch.zeros_like(cos), n * cos / torch.where(bad, torch.ones_like(den), den))
    return t.clamp(0.0, 1.0) if clamp else t


@register(
    "model_stock",
    aliases=("modelstock",),
    paper="Jang, Yun, Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv 2403.19522)",
    math="t = N cos(phi) / (1 + (N-1) cos(phi)); theta = t * mean(theta_i) + (1-t) * theta_0, "
    "cos(phi) = mean pairwise cosine of theta_i - theta_0",
    base="required",
    granularity="tensor",
    params=(
        Param("filter_wise", bool, False, help="one ratio per row (last dim) instead of per tensor (mergekit: not recommended)"),
        Param("cos_mode", str, "cosine", choices=("cosine", "angle"), help="combine pairs by mean cosine or mean angle"),
        Param("clamp", bool, True, help="clamp t to [0, 1]; false reproduces mergekit"),
    ),
    min_models=2,
    mergekit="mergekit `model_stock` = cos_mode: cosine, clamp: false (it does not clamp t).",
    mergekit_params={"cos_mode": "cosine", "clamp": False},
    notes="meant for a few fine-tunes of one task from the same anchor (e.g. two seeds), not multi-task merging.",
    example={},
    chunkable=lambda p, name, shape: bool(p["filter_wise"]),
    sums=lambda ctx, base, models, p: gram(models, base),  # Gram of the offsets, without forming them
)
def model_stock(ctx, base, models, p):
    shape = base.shape
    n = len(models)
    if p["filter_wise"] and base.dim() >= 1:  # one ratio per row (last dim)
        view = (-1, shape[-1])
        deltas = [(m - base).reshape(view) for m in models]
        norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
        dots = {(i, j): torch.linalg.vecdot(deltas[i], deltas[j], dim=-1) for i in range(n) for j in range(i + 1, n)}
        del deltas
    else:
        g = ctx.sums if ctx.sums is not None else gram(models, base)
        g = g.to(base.device)
        norms = [g[i, i].clamp_min(0).sqrt().reshape(1) for i in range(n)]
        dots = {(i, j): g[i, j].reshape(1) for i in range(n) for j in range(i + 1, n)}
    pairs = []
    for (i, j), dot in dots.items():
        c = (dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
        pairs.append(torch.arccos(c) if p["cos_mode"] == "angle" else c)
    comb = torch.stack(pairs).mean(dim=0)
    cos = torch.cos(comb) if p["cos_mode"] == "angle" else comb
    t = interpolation_ratio(cos, n, p["clamp"]).to(base.dtype).unsqueeze(-1)
    filter_wise = p["filter_wise"] and base.dim() >= 1
    view = (-1, shape[-1]) if filter_wise else (-1,)
    out = models[0].reshape(view)
    out = out if ctx.owned else out.clone()  # owned inputs may be overwritten
    xs, b = [m.reshape(view) for m in models[1:]], base.reshape(view)
    t = t if filter_wise else t.reshape(1)
    # per row, or (one ratio) in cache-sized blocks: t * mean(theta_i) + (1 - t) * theta_0
    ranges = [(0, out.shape[0])] if filter_wise else inline_blocks(out.numel(), out.device)
    for a, e in ranges:
        acc = out[a:e]
        for x in xs:
            acc.add_(x[a:e])
        tb = t[a:e] if filter_wise else t
        acc.div_(n).mul_(tb).addcmul_(b[a:e], 1.0 - tb)
    return out.reshape(shape)
