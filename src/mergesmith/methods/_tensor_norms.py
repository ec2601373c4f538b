"""The l1/l2 rescale of DARE, DELLA and Breadcrumbs on a tensor too big to hold whole, from norms summed over its
row chunks.

``rescale: l1`` (mergekit's default) or ``l2`` scales each model's pruned task vector by
||tau_i|| / ||pruned_i|| over the whole tensor (``kernels.rescale``; factor 1 where a norm is below 1e-7), so
a tensor used to be held whole for it (an embedding: float32 copies of every input). The engine now streams
such a tensor in one sums phase over its row chunks (``MethodSpec.sums``): per chunk and model, the sums of
|tau_i|^p and |pruned_i|^p in float64, pruned by the sparsifier with the chunk's own seeded draw and factor 1;
then the apply chunks draw the same masks (the same chunk seeds) and scale by the whole tensor's factor.

Draws are seeded per row chunk (``TensorContext.seed_of``), as for every sparsifier on a streamed tensor, so
a tensor streamed this way draws other masks than the same tensor held whole: the same distribution, and the
same bytes for the same recipe and seed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kernels import norm_ratio


@dataclass
class RescaleFactors:
    """Per model: the whole tensor's ||tau_i|| / ||pruned_i|| (1 where a norm is below 1e-7)."""

    factors: list[float]


def factor(ctx, i: int) -> float | None:
    """The streamed rescale factor of model ``i`` in an apply chunk, or None (the sparsifier computes it)."""
    return ctx.sums.factors[i] if isinstance(ctx.sums, RescaleFactors) else None


def collect(sparsify, ctx, base: torch.Tensor, models: list[torch.Tensor], p) -> torch.Tensor:
    """float64 [N, 2]: this chunk's sums of |tau_i|^p and |pruned_i|^p (p = 1 for l1, 2 for l2)."""
    order = 1 if p["rescale"] == "l1" else 2
    unit = replace(ctx, sums=RescaleFactors([1.0] * len(models)), owned=True)
    b = base.to(torch.float32)
    out = torch.zeros(len(models), 2, dtype=torch.float64)
    for i, m in enumerate(models):
        t = m.to(torch.float32) - b
        out[i, 0] = _power_sum(t, order)
        out[i, 1] = _power_sum(sparsify(unit, i, t.clone(), p), order)
    return out


def finish(total: torch.Tensor, p) -> RescaleFactors:
    order = 1 if p["rescale"] == "l1" else 2
    norms = total.pow(1.0 / order)
    return RescaleFactors([float(norm_ratio(n0, n1) or 1.0) for n0, n1 in norms.tolist()])


def _power_sum(t: torch.Tensor, order: int) -> float:
    a = t.reshape(-1).abs().to(torch.float64)
    return float(a.sum() if order == 1 else a.square().sum())
