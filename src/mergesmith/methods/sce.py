"""SCE (Select, Calculate, Erase): variance-selected, energy-weighted, sign-consensus task vectors.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (arXiv 2408.07990), Sec. "SCE"; the authors'
reference implementation is mergekit `sce`.

Per tensor, with tau_i = theta_i - theta_0:

1. Select: if select_topk < 1, keep the k = int(select_topk * #{var != 0}) positions of largest
   variance across models, var = Var_i(tau_i) (population variance), and zero the rest in every tau_i.
2. Calculate: eta_i = mean(tau_i^2) / sum_j mean(tau_j^2)  (uniform when every tau is 0).
3. Erase: elected sign s = sgn(sum_i tau_i) (0 counts as +); m_i = [sgn(tau_i) == s] (zeros never match).
4. theta = theta_0 + sum_i m_i eta_i tau_i / sum_i m_i eta_i   (divisor 1 where it is 0; ``normalize``)
   or theta_0 + sum_i m_i eta_i tau_i with ``normalize: false``.

With one model the variance is 0 everywhere, so select_topk < 1 keeps nothing (theta = theta_0), as in
mergekit. The paper's default tau% is not verified here; mergekit's default 1.0 (no selection) is kept.
"""
from __future__ import annotations

import torch

from .base import Param, register
from .kernels import disjoint_merge, elect_sign, task_vectors


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Top ``fraction`` of the non-zero-variance positions of stacked deltas [N, ...] by variance."""
    var = deltas.var(dim=0, unbiased=False)
    k = int(abs(fraction) * int(torch.count_nonzero(var)))
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        mask[torch.topk(var.reshape(-1), k).indices] = True
    return mask.reshape(var.shape)


@register(
    "sce",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models (arXiv 2408.07990), SCE merging",
    math="tau_i masked to the top-variance positions; eta_i ∝ mean(tau_i^2); "
    "theta = theta_0 + sum_i m_i eta_i tau_i / sum_i m_i eta_i, m_i = [sgn tau_i = sgn sum_j tau_j]",
    base="required",
    granularity="tensor",
    params=(
        Param("select_topk", float, 1.0, help="fraction of highest-variance positions kept (1 = no selection)"),
        Param("normalize", bool, True, help="divide by the summed weights of the agreeing models"),
        Param("int8_mask", bool, False, help="accepted for mergekit recipes; no effect (masks are bool here)"),
    ),
    min_models=1,
    mergekit="identical to mergekit `sce` (normalize: true).",
    notes="weights are computed from the task vectors, not configured.",
    example={"select_topk": 0.5},
)
def sce(ctx, base, models, p):
    deltas = torch.stack(task_vectors(base, models))
    if p["select_topk"] < 1:
        deltas = deltas * variance_mask(deltas, p["select_topk"])
    energy = deltas.reshape(len(models), -1).pow(2).mean(dim=1)
    total = energy.sum()
    eta = energy / total if total > 0 else torch.full_like(energy, 1.0 / len(models))
    sign = elect_sign(deltas, rule="mass", zero_fallback="positive")
    w = eta.reshape((-1,) + (1,) * (deltas.dim() - 1))
    agg = "weighted_mean" if p["normalize"] else "sum"
    return base + disjoint_merge(deltas * w, sign, agg=agg, weights=eta)
