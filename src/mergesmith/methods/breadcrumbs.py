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

Equal magnitudes at the band's edges: in row scope the ranks are stable (ascending |tau|, equal values by
position, as DELLA's; the official code's torch.topk leaves the choice to the implementation), so the CPU
kernels (one SIMD sort per row, ``_rank.row_keys``, block by block) and the torch path agree bit for
bit; in tensor scope the band is mergekit's slice of ``torch.sort(|tau|)`` (the same call, so the same
tied entries as mergekit on the same torch).

mergekit's ``breadcrumbs`` = ``scope: tensor, lambda: 1`` (its default gamma is 0.01);
``breadcrumbs_ties`` likewise.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _fused
from . import _gta as G
from . import _rank as R
from . import _tensor_norms as TN
from . import kernels as K
from .base import register


def band_mask(x: torch.Tensor, n_bot: int, n_keep: int, stable: bool = True) -> torch.Tensor:
    """Per row of ``x`` [R, n]: True at ascending magnitude ranks n_bot .. n_bot + n_keep - 1. ``stable``:
    equal magnitudes ranked by position (row scope); else in ``torch.sort``'s order of the flattened
    tensor, as mergekit's ``magnitude_outliers`` (tensor scope)."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    if n_keep <= 0:
        return mask
    if stable:
        order = torch.argsort(K.float_bits(x.abs()), dim=-1, stable=True)
    else:
        order = torch.sort(x.abs().reshape(-1)).indices.reshape(x.shape)
    return mask.scatter_(-1, order[..., n_bot:n_bot + n_keep], True)


def band_rows_(x: np.ndarray, lo: int, hi: int, m: np.ndarray | None = None, base: np.ndarray | None = None) -> None:
    """In place on C-contiguous float32 rows ``x``: every element whose stable in-row rank (ascending |x|)
    is outside lo .. hi-1 is multiplied by 0 (the values of ``t * band_mask(t, lo, hi - lo)``). With ``m``
    and ``base`` (fused kernels only): x = float32(m) - base is formed first, in the ranking pass."""
    if m is not None or _fused.enabled(x.size):
        order, mask = R.row_keys_sub(x, m, base)
        _fused.band_apply(x, order, mask, lo, hi)
        return
    order = R.row_order(x)
    drop = np.concatenate([order[:, :lo], order[:, hi:]], axis=1)
    np.put_along_axis(x, drop, np.take_along_axis(x, drop, 1) * np.float32(0.0), 1)


def _band(p, i: int, n: int, scope: str) -> tuple[int, int]:
    """(n_bot, n_keep): the band's first ascending rank and width in a row (tensor) of n entries."""
    beta, gamma = p["density"][i], p["gamma"][i]
    if scope == "tensor":  # mergekit: fewer outliers removed to keep floor(beta n)
        n_keep = int(beta * n)
        n_top = min(int(gamma * n), n - n_keep)
    else:  # official: fewer kept
        n_top = int(gamma * n)
        n_keep = min(int(beta * n), n - n_top)
    return n - n_top - n_keep, n_keep


def breadcrumbs_sparsify(ctx, i: int, t: torch.Tensor, p) -> torch.Tensor:
    if t.numel() == 0:
        return t
    scope = p["scope"]
    if scope == "tensor":
        if p["density"][i] >= 1:  # mergekit: density 1 leaves the tensor as is
            return t
        flat = t.reshape(1, -1)
    else:
        if t.dim() == 0:
            return t
        flat = t.reshape(-1, t.shape[-1])
    n = flat.shape[-1]
    n_bot, n_keep = _band(p, i, n, scope)
    if n_bot == 0 and n_keep >= n:
        return t
    mask = band_mask(flat, n_bot, n_keep, stable=scope != "tensor").reshape(t.shape)
    return K.rescale_(t, lambda x: x.mul_(mask), p["rescale"], factor=TN.factor(ctx, i))


def breadcrumbs_block(ctx, i: int, p, row: int):
    """Block form of :func:`breadcrumbs_sparsify` for the GTA block path (blocks of whole rows of length
    ``row``): ``fn(x, start)`` overwriting a float32 CPU block; None where only the whole-tensor form
    applies (tensor scope, l1/l2 rescale)."""
    if p["scope"] != "row" or p["rescale"] != "none":
        return None
    n_bot, n_keep = _band(p, i, row, "row")
    if n_bot == 0 and n_keep >= row:
        return lambda x, start: None
    return BandBlock(row, n_bot, n_bot + n_keep)


class BandBlock(R.RowSparsifier):
    """The band on blocks of whole rows of length ``row`` (ranks lo .. hi-1 kept; ``_rank.RowSparsifier``)."""

    def __init__(self, row: int, lo: int, hi: int):
        self.row, self.lo, self.hi = row, lo, hi

    def rows(self, x: np.ndarray, start: int, m: np.ndarray | None = None, base: np.ndarray | None = None) -> None:
        band_rows_(x, self.lo, self.hi, m, base)


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


_LINEAR = G.Pipeline("breadcrumbs", sparsify=breadcrumbs_sparsify, block_sparsify=breadcrumbs_block, row_blocks=True)
_TIES = G.Pipeline("breadcrumbs_ties", sparsify=breadcrumbs_sparsify, consensus=True, block_sparsify=breadcrumbs_block,
                   row_blocks=True)

PAPER = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)"


@register(
    "breadcrumbs",
    validate=_LINEAR.validate,
    chunkable=_LINEAR.chunkable,
    sums=_LINEAR.sums,
    sum_phases=_LINEAR.sum_phases,
    finish_sums=_LINEAR.finish_sums,
    raw_inputs=_LINEAR.raw_inputs,
    aliases=("model_breadcrumbs",),
    paper=PAPER,
    math="BC(tau_i) keeps |tau| ranks (gamma n, (gamma + beta) n] per row; theta = theta_0 + lambda * sum_i w_i BC(tau_i)",
    base="required",
    granularity="row",
    params=(*_params(), G.normalize_param(False, consensus=False), G.int8_mask_param()),
    mergekit="mergekit `breadcrumbs` = scope: tensor, lambda: 1 (and gamma: 0.01 is its default).",
    mergekit_params={"density": 1.0, "gamma": 0.01, "scope": "tensor", "lambda": 1.0},
    example={"density": 0.5, "gamma": 0.05},
)
def breadcrumbs(ctx, base, models, p):
    return _LINEAR.merge(ctx, base, models, p)


@register(
    "breadcrumbs_ties",
    validate=_TIES.validate,
    chunkable=_TIES.chunkable,
    sums=_TIES.sums,
    sum_phases=_TIES.sum_phases,
    finish_sums=_TIES.finish_sums,
    raw_inputs=_TIES.raw_inputs,
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
    mergekit_params={"density": 1.0, "gamma": 0.01, "scope": "tensor", "lambda": 1.0},
    example={"density": 0.5, "gamma": 0.05},
)
def breadcrumbs_ties(ctx, base, models, p):
    return _TIES.merge(ctx, base, models, p)
