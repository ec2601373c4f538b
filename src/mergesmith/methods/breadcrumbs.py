"""Model Breadcrumbs: drop both tails of each task vector, then task arithmetic (or TIES).

Davari, Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024 (arXiv 2312.06795); official code rezazzr/breadcrumbs (TaskVectorMiddleKeep).

Within each row of tau_i (last dim, n entries; official) or over the whole tensor (mergekit):

    n_top  = floor(gamma n)  largest |tau| removed (outliers)
    n_keep = floor(beta n)   next largest kept, the rest (small entries) removed
    BC(tau_i) keeps magnitude ranks n_top .. n_top + n_keep - 1 (descending)
    breadcrumbs:      theta = theta_0 + lambda * sum_i w_i BC(tau_i)   [/ sum_i w_i if normalize]
    breadcrumbs_ties: sign election (weighted, 0 -> +1) and disjoint sum over BC(tau_i) (mergekit's variant)

Parameter names are mergekit's so Hub recipes run: ``density`` = the paper's beta (``top_k_keep``, the
kept fraction), ``gamma`` = the paper's removed top-outlier fraction (``top_k_remove``), ``lambda`` =
the paper's alpha. Defaults: the official search start point beta 0.15, gamma 0.006, alpha 0.2.
When gamma + beta > 1: the official code (row scope) keeps fewer entries, mergekit (tensor scope)
removes fewer outliers to keep floor(beta n). 0-D tensors are left unsparsified in row scope (official).

mergekit's ``breadcrumbs`` = ``scope: tensor, lambda: 1`` (its default gamma is 0.01);
``breadcrumbs_ties`` likewise.
"""
from __future__ import annotations

import torch

from . import _gta as G
from . import kernels as K
from .base import register


def band_mask(x: torch.Tensor, n_top: int, n_keep: int) -> torch.Tensor:
    """Per row of ``x`` [R, n]: True at descending magnitude ranks n_top .. n_top + n_keep - 1."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    if n_keep <= 0:
        return mask
    a = x.abs()
    if n_top == 0:
        idx = torch.topk(a, n_keep, dim=-1, sorted=False).indices
    else:
        idx = torch.topk(a, n_top + n_keep, dim=-1, sorted=True).indices[..., n_top:]
    return mask.scatter_(-1, idx, True)


def breadcrumbs_sparsify(ctx, i: int, t: torch.Tensor, p) -> torch.Tensor:
    beta, gamma = p["density"][i], p["gamma"][i]
    if t.numel() == 0:
        return t
    if p["scope"] == "tensor":
        if beta >= 1:  # mergekit: density 1 leaves the tensor as is
            return t
        flat = t.reshape(1, -1)
        n = flat.shape[-1]
        n_keep = int(beta * n)
        n_top = min(int(gamma * n), n - n_keep)
    else:
        if t.dim() == 0:
            return t
        flat = t.reshape(-1, t.shape[-1])
        n = flat.shape[-1]
        n_top = int(gamma * n)
        n_keep = min(int(beta * n), n - n_top)
    if n_top == 0 and n_keep >= n:
        return t
    kept = t * band_mask(flat, n_top, n_keep).reshape(t.shape)
    return K.rescale(t, kept, p["rescale"])


def _params(scope_default: str = "row"):
    return (
        G.density_param(0.15, "beta: fraction kept after the outlier cut (paper top_k_keep, start point 0.15)"),
        G.Bounded("gamma", float, 0.006, scope="model", lo=0.0, hi=1.0,
                  help="fraction of largest |tau| removed (paper top_k_remove, start point 0.006; mergekit 0.01)"),
        G.weight_param(),
        G.lambda_param(0.2, "alpha, scale of the summed task vectors (paper start point 0.2)"),
        G.Param("scope", str, scope_default, choices=("row", "tensor"),
                help="rank within each row (official) or over the whole tensor (mergekit)"),
        G.rescale_param("none", ("none", "l1", "l2"), "match the norm of tau_i after masking"),
    )


_LINEAR = G.Pipeline("breadcrumbs", sparsify=breadcrumbs_sparsify)
_TIES = G.Pipeline("breadcrumbs_ties", sparsify=breadcrumbs_sparsify, consensus=True)

PAPER = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)"


@register(
    "breadcrumbs",
    validate=_LINEAR.validate,
    chunkable=_LINEAR.chunkable,
    aliases=("model_breadcrumbs",),
    paper=PAPER,
    math="BC(tau_i) keeps |tau| ranks (gamma n, (gamma + beta) n] per row; theta = theta_0 + lambda * sum_i w_i BC(tau_i)",
    base="required",
    granularity="row",
    params=(*_params(), G.normalize_param(False, consensus=False), G.int8_mask_param()),
    mergekit="mergekit `breadcrumbs` = scope: tensor, lambda: 1 (and gamma: 0.01 is its default).",
    example={"density": 0.5, "gamma": 0.05},
)
def breadcrumbs(ctx, base, models, p):
    return _LINEAR.merge(ctx, base, models, p)


@register(
    "breadcrumbs_ties",
    validate=_TIES.validate,
    chunkable=_TIES.chunkable,
    aliases=(),
    paper=PAPER + "; sign election from TIES (mergekit's combination)",
    math="BC(tau_i) as breadcrumbs; gamma = sgn(sum_i w_i BC(tau_i)) (0 -> +1); "
         "theta = theta_0 + lambda * sum_i w_i BC(tau_i)[agree]",
    base="required",
    granularity="row",
    params=(
        *_params(),
        *G.consensus_params(elect="mass", agg="sum", zero_sign="positive", weighted_elect=True),
        G.int8_mask_param(),
    ),
    mergekit="mergekit `breadcrumbs_ties` = scope: tensor, lambda: 1 (normalize false is its default too).",
    example={"density": 0.5, "gamma": 0.05},
)
def breadcrumbs_ties(ctx, base, models, p):
    return _TIES.merge(ctx, base, models, p)
