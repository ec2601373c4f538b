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
"""
from __future__ import annotations

import torch

from .base import Param, register


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
    notes="meant for a few fine-tunes of one task from the same anchor (e.g. two seeds), not multi-task merging.",
    example={},
)
def model_stock(ctx, base, models, p):
    shape = base.shape
    view = (-1, shape[-1]) if p["filter_wise"] and base.dim() >= 1 else (1, -1)  # rows, or one row
    w0 = base.reshape(view)
    ws = [m.reshape(view) for m in models]
    deltas = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    pairs = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = torch.linalg.vecdot(deltas[i], deltas[j], dim=-1)  # no full-size temporary
            c = (dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
            pairs.append(torch.arccos(c) if p["cos_mode"] == "angle" else c)
    del deltas
    comb = torch.stack(pairs).mean(dim=0)
    cos = torch.cos(comb) if p["cos_mode"] == "angle" else comb
    n = len(models)
    t = interpolation_ratio(cos, n, p["clamp"]).unsqueeze(-1)
    out = ws[0].clone()
    for w in ws[1:]:
        out.add_(w)
    out.div_(n).mul_(t)  # t * mean(theta_i)
    return out.addcmul_(w0, 1.0 - t).reshape(shape)
