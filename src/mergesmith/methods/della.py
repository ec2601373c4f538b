"""DELLA-Merging: MagPrune (magnitude-ranked drop probabilities), then elect and fuse.

Deep, Bhardwaj, Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (arXiv 2406.11617); official code declare-lab/della.

MagPrune, per row (last dim; 0-D/1-D tensors are one row), for model i with keep rate d and
half-window eps:

    rk_j  = ascending rank of |tau_j| in its row (stable: equal magnitudes ranked by position)
    rho_j = (rk_j - 1) / (n - 1)          (rho = 1 for a row of length 1)
    q_j   = (d - eps) + 2 eps rho_j        keep probability: d - eps (smallest) ... d + eps (largest)
    tau~_j = Bernoulli(q_j) * tau_j / q_j  (paper rescale, per element; unbiased)

Bernoulli(q_j) = 1[u_j < q_j], u from the SplitMix64 stream of ctx.seed_of(i) (:mod:`._sampling`). On the
CPU the exact stable ranks come from one SIMD sort per row of unique 32-bit keys (64-bit keys for the
rows those cannot order; :func:`._rank.row_order`), fused with the draw and the rescale block by block over threads.

della:        gamma = sgn(sum_i w_i tau~_i) (0 -> +1), theta = theta_0 + lambda * sum_i w_i tau~_i[agree] / sum_i w_i[agree]
della_linear: theta = theta_0 + lambda * sum_i w_i tau~_i  [/ sum_i w_i if normalize]

Defaults: the official README example p = 0.3 (density 0.7), window 0.14 (epsilon 0.07), lambda 1.1.
The official code is a mergekit fork, so its elect/fuse are mergekit's (weights before election,
+1 for zero signs, weighted mean). We require 0 < d - eps and d + eps <= 1 (the official code only
prints a warning; mergekit raises for d + eps >= 1). Density 1 skips pruning.
mergekit differs only in ``rescale: l1`` (L1-norm match over the tensor instead of 1/q_j) and its
default epsilon 0.15; ``della_linear`` is mergekit's (no election, normalize false, lambda 1).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from . import _fused
from . import _gta as G
from . import _rank as R
from . import _sampling as S
from . import _tensor_norms as TN
from . import kernels as K
from .base import MergeError, register

RESCALE = ("inverse_keep_prob", "l1", "l2", "none")


def _q_of_rank(n: int, d: float, eps: float) -> torch.Tensor:
    """q for ranks 0..n-1 of a row (n >= 2): the same float32 operations as on a full row."""
    rho = torch.arange(n, dtype=torch.float32).div_(n - 1)
    return (d - eps) + (2 * eps) * rho


@functools.lru_cache(maxsize=64)
def _q_table(n: int, d: float, eps: float) -> np.ndarray:
    """:func:`_q_of_rank` as a numpy array, made once per (row length, d, eps); shared: never written."""
    return _q_of_rank(n, d, eps).numpy()


def _by_rank(x: np.ndarray, vals: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out[r, j] = vals[rk(r, j)], rk = stable ascending rank of |x[r, j]| in row r (C-contiguous float32
    rows; ``vals``: float32, one value per rank)."""
    r, n = x.shape
    if out is None:
        out = np.empty((r, n), dtype=np.float32)
    torch.from_numpy(out).scatter_(1, torch.from_numpy(R.row_order(x)), torch.from_numpy(vals).expand(r, n))
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)


def _fast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() >= 1 and t.shape[-1] >= 2


def _row_blocks(n: int, d: float, eps: float) -> tuple[int, np.ndarray]:
    """Rows per work item and q by rank."""
    return max(1, S.BLOCK // n), _q_table(n, d, eps)


def magprune_probs(t: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    """Keep probabilities q (shape of ``t``) from the within-row magnitude ranks."""
    rows = _rows(t)
    n = rows.shape[-1]
    if n <= 1:
        rho = torch.ones_like(rows)
    elif _fast(t):
        x = rows.contiguous().numpy()
        out = torch.empty(rows.shape, dtype=torch.float32)
        on = out.numpy()
        step, q = _row_blocks(n, d, eps)
        S.run_blocks(x.shape[0], step, lambda a, b: _by_rank(x[a:b], q, out=on[a:b]))
        return out.reshape(t.shape)
    else:
        # int32 bit patterns of |x| sort like the values (IEEE order) and ~30% faster than floats
        order = torch.argsort(K.float_bits(rows.abs()), dim=-1, stable=True)
        ranks = torch.arange(n, dtype=torch.float32, device=t.device).expand_as(rows)
        rho = torch.empty_like(rows).scatter_(-1, order, ranks).div_(n - 1)
    return ((d - eps) + (2 * eps) * rho).reshape(t.shape)


def _magprune_fused_(t: torch.Tensor, d: float, eps: float, seed: int) -> torch.Tensor:
    """In place on a contiguous float32 CPU tensor: t <- t * keep / q, keep = u < q, row block by row
    block (rank, draw and rescale in one pass over memory; the values of the unfused formula)."""
    x = t.view(-1, t.shape[-1]).numpy()
    n = x.shape[1]
    step, qr = _row_blocks(n, d, eps)
    S.run_blocks(x.shape[0], step, lambda a, b: _magprune_rows_(x[a:b], qr, seed, a * n))
    return t


def _magprune_rows_(x: np.ndarray, qr: np.ndarray, seed: int, start: int, m: np.ndarray | None = None,
                    base: np.ndarray | None = None) -> None:
    """In place on float32 rows ``x`` whose first element is element ``start`` of the stream:
    x <- x * keep / q, q = ``qr`` by within-row rank, keep = u < q. With ``m`` and ``base`` (fused kernels
    only): x = float32(m) - base is formed first, in the ranking pass (``m`` the bf16 bits of the model block)."""
    r, n = x.shape
    if m is not None or _fused.enabled(x.size):  # rank -> q -> draw -> rescale in one pass: the same float32 operations
        order, mask = R.row_keys_sub(x, m, base)
        _fused.magprune_apply(x, order, mask, qr, seed, start)
        return
    q = _by_rank(x, qr, out=R.scratch("q", (r, n), np.float32))
    keep = np.less(S.uniform_np(seed, start, r * n).reshape(r, n), q)
    np.multiply(x, keep, out=x)
    np.divide(x, q, out=x)


class MagPruneBlock(R.RowSparsifier):
    """MagPrune on blocks of whole rows of length ``row`` for the GTA block path (``_rank.RowSparsifier``)."""

    def __init__(self, row: int, qr: np.ndarray, seed: int):
        self.row, self.qr, self.seed = row, qr, seed

    def rows(self, x: np.ndarray, start: int, m: np.ndarray | None = None, base: np.ndarray | None = None) -> None:
        _magprune_rows_(x, self.qr, self.seed, start, m, base)


def magprune(ctx, i: int, t: torch.Tensor, p) -> torch.Tensor:
    """MagPrune of task vector ``t`` (a fresh tensor, overwritten on the CPU fast path)."""
    d, eps = p["density"][i], p["epsilon"][i]
    if d >= 1 or t.numel() == 0:
        return t
    mode = p["rescale"]
    seed = ctx.seed_of(i)
    # q >= d - eps > 0 (check_window); the fused path skips rescale()'s clamp at 1e-12
    if mode == "inverse_keep_prob" and _fast(t) and t.is_contiguous() and float(_q_table(2, d, eps)[0]) >= 1e-12:
        return _magprune_fused_(t, d, eps, seed)
    q = magprune_probs(t, d, eps)
    mask = K.bernoulli_mask(t.shape, q, seed)
    if mode != "inverse_keep_prob":  # in place: no pruned or rescaled copy of the tensor
        return K.rescale_(t, lambda x: x.mul_(mask), mode, factor=TN.factor(ctx, i))
    return K.rescale(t, t * mask, mode, keep_prob=q)


def magprune_block(ctx, i: int, p, row: int):
    """Block form of :func:`magprune` for the GTA block path (blocks of whole rows of length ``row``):
    ``fn(x, start)`` overwrites a float32 CPU block that starts at flat element ``start`` with the values of
    the whole-tensor fast path; None where only the whole-tensor form applies."""
    d, eps = p["density"][i], p["epsilon"][i]
    if d >= 1:
        return lambda x, start: None
    if p["rescale"] != "inverse_keep_prob" or row < 2 or float(_q_table(2, d, eps)[0]) < 1e-12:
        return None
    return MagPruneBlock(row, _q_table(row, d, eps), ctx.seed_of(i))


def check_window(p) -> None:
    for i, (d, eps) in enumerate(zip(p["density"], p["epsilon"])):
        if d < 1 and not (d - eps > 0 and d + eps <= 1):
            raise MergeError(f"della: need 0 < density - epsilon and density + epsilon <= 1, got density {d:g}, "
                             f"epsilon {eps:g} for model {i}; lower epsilon or change density")


def _params(lam: float, lam_help: str):
    return (
        G.density_param(0.7, "average keep rate d = 1 - p (README example p = 0.3)"),
        G.Bounded("epsilon", float, 0.07, scope="model", lo=0.0, hi=1.0,
                  help="half-window: keep probability spans d - eps .. d + eps (official window_size = 2 eps)"),
        G.weight_param(),
        G.lambda_param(lam, lam_help),
        G.rescale_param("inverse_keep_prob", RESCALE, "survivor rescale: 1/q_j per element (paper) or l1 (mergekit)"),
    )


_DELLA = G.Pipeline("della", sparsify=magprune, consensus=True, check=check_window, block_sparsify=magprune_block,
                    row_blocks=True)
_LINEAR = G.Pipeline("della_linear", sparsify=magprune, check=check_window, block_sparsify=magprune_block,
                     row_blocks=True)

PAPER = "Deep et al., DELLA-Merging (MagPrune), 2024 (arXiv 2406.11617)"


@register(
    "della",
    validate=_DELLA.validate,
    chunkable=_DELLA.chunkable,
    sums=_DELLA.sums,
    sum_phases=_DELLA.sum_phases,
    finish_sums=_DELLA.finish_sums,
    raw_inputs=_DELLA.raw_inputs,
    aliases=("della_merging",),
    paper=PAPER,
    math="q_j = (d - eps) + 2 eps rank_j/(n-1) per row; tau~ = Bernoulli(q) tau / q; gamma = sgn(sum_i w_i tau~_i); "
         "theta = theta_0 + lambda * sum_i w_i tau~_i[agree] / sum_i w_i[agree]",
    base="required",
    granularity="row",
    params=(
        *_params(1.1, "scale of the merged task vector (README example 1.1)"),
        *G.consensus_params(elect="mass", agg="weighted_mean", zero_sign="positive", weighted_elect=True),
        G.int8_mask_param(),
    ),
    mergekit="mergekit `della` = rescale: l1 (and its epsilon default is 0.15, lambda 1.0).",
    mergekit_params={"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": "l1"},
    example={},
)
def della(ctx, base, models, p):
    return _DELLA.merge(ctx, base, models, p)


@register(
    "della_linear",
    validate=_LINEAR.validate,
    chunkable=_LINEAR.chunkable,
    sums=_LINEAR.sums,
    sum_phases=_LINEAR.sum_phases,
    finish_sums=_LINEAR.finish_sums,
    raw_inputs=_LINEAR.raw_inputs,
    aliases=(),
    paper=PAPER,
    math="q_j = (d - eps) + 2 eps rank_j/(n-1) per row; tau~ = Bernoulli(q) tau / q; "
         "theta = theta_0 + lambda * sum_i w_i tau~_i [/ sum_i w_i]",
    base="required",
    granularity="row",
    params=(
        *_params(1.0, "scale of the summed task vectors"),
        G.normalize_param(False, consensus=False),
        G.int8_mask_param(),
    ),
    mergekit="mergekit `della_linear` = rescale: l1 (epsilon default 0.15 there).",
    mergekit_params={"density": 1.0, "epsilon": 0.15, "rescale": "l1"},
    example={},
)
def della_linear(ctx, base, models, p):
    return _LINEAR.merge(ctx, base, models, p)
