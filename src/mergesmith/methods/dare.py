"""DARE: Drop And REscale, with task arithmetic (``dare_linear``) or TIES (``dare_ties``).

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv 2311.03099); official code yule-BUAA/MergeLM.

    m_i ~ Bernoulli(d_i) element-wise (drop rate p_i = 1 - d_i): m = 1[u < d_i], u from the SplitMix64
    stream of ctx.seed_of(i) (see _sampling)
    tau~_i = m_i * tau_i / d_i                     (unbiased: E[tau~_i] = tau_i)
    dare_linear: theta = theta_0 + lambda * sum_i w_i tau~_i   [/ sum_i w_i if normalize]
    dare_ties:   TIES (trim, elect, disjoint merge) on tau~_i

``rescale``: ``inverse_keep_prob`` = the paper's 1/(1-p); ``l1``/``l2`` = match the norm of tau_i over
the tensor (mergekit's default, equal to 1/d only in expectation); ``none``.
Defaults: density 0.8 (drop rate 0.2, the README's LLM example with task arithmetic, lambda 1).
SFT deltas tolerate p = 0.9 (density 0.1) in the paper; keep p <= 0.5 for larger deltas.

dare_ties, two published variants:
* MergeLM (paper, default): after DARE, the TIES step *trims again* with its own mask rate
  (``ties_density``, default 0.2 = param_value_mask_rate 0.8) over the whole model (``scope: global``),
  elects on the unweighted vectors with the global-majority fallback, and takes the disjoint mean.
* mergekit: no second trim, weights applied before the election, elected sign 0 -> +1, weighted
  *sum* (normalize false): ``ties_density: 1, rescale: l1, weighted_elect: true, zero_sign: positive,
  normalize: false``.
"""
from __future__ import annotations

import torch

from . import _gta as G
from . import _sampling as S
from . import _tensor_norms as TN
from . import kernels as K
from .base import register

RESCALE = ("inverse_keep_prob", "l1", "l2", "none")


def dare_sparsify(ctx, i: int, t: torch.Tensor, p) -> torch.Tensor:
    """Drop each entry with probability 1 - density_i and rescale the survivors. ``t`` is a fresh task
    vector and is overwritten on the CPU fast path (one fused pass: draw, mask, divide by d)."""
    d = p["density"][i]
    if d >= 1:
        return t
    if d <= 0:
        return torch.zeros_like(t)
    seed = ctx.seed_of(i)
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():  # in place, one pass per block
        if p["rescale"] == "inverse_keep_prob":
            return S.drop_rescale_(t, d, seed)
        return K.rescale_(t, lambda x: S.drop_(x, d, seed), p["rescale"], factor=TN.factor(ctx, i))
    mask = K.bernoulli_mask(t.shape, d, seed, device=t.device)
    return K.rescale(t, t * mask, p["rescale"], keep_prob=d, factor=TN.factor(ctx, i))


def dare_block(ctx, i: int, p, row: int):
    """Block form of :func:`dare_sparsify` for the GTA block path: ``fn(x, start)`` overwriting a float32
    CPU block of the task vector that starts at flat element ``start`` (the same values as the whole-
    tensor fast path), or None where only the whole-tensor form applies (l1/l2 rescale)."""
    d = p["density"][i]
    if d <= 0:
        return lambda x, start: x.zero_()
    if d < 1 and p["rescale"] != "inverse_keep_prob":
        return None
    return S.DropBlock(d, ctx.seed_of(i))


def _dare_params():
    return (
        G.density_param(0.8, "keep probability d = 1 - drop rate p (README LLM example p = 0.2)"),
        G.weight_param(),
        G.rescale_param("inverse_keep_prob", RESCALE, "survivor rescale: 1/d (paper), l1/l2 norm match (mergekit l1), none"),
    )


_LINEAR = G.Pipeline("dare_linear", sparsify=dare_sparsify, block_sparsify=dare_block)
_TIES = G.Pipeline("dare_ties", sparsify=dare_sparsify, trim="ties_density", consensus=True, block_sparsify=dare_block)

MERGEKIT_TIES = "ties_density: 1, rescale: l1, weighted_elect: true, zero_sign: positive, normalize: false"


@register(
    "dare_linear",
    validate=_LINEAR.validate,
    chunkable=_LINEAR.chunkable,
    sums=_LINEAR.sums,
    sum_phases=_LINEAR.sum_phases,
    finish_sums=_LINEAR.finish_sums,
    raw_inputs=_LINEAR.raw_inputs,
    aliases=("dare", "dare_ta", "dare_task_arithmetic"),
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    math="tau~_i = Bernoulli(d_i) * tau_i / d_i; theta = theta_0 + lambda * sum_i w_i tau~_i [/ sum_i w_i]",
    base="required",
    granularity="element",
    params=(
        *_dare_params(),
        G.lambda_param(1.0, "task-arithmetic scale (paper: tuned; README example 1.0)"),
        G.normalize_param(False, consensus=False),
        G.int8_mask_param(),
    ),
    mergekit="mergekit `dare_linear` = rescale: l1 (its default rescale=true matches the L1 norm).",
    mergekit_params={"density": 1.0, "rescale": "l1"},
    notes="p = 0 (density 1) is the identity on each task vector. Seeded per (seed, tensor, model).",
    example={"density": 0.5},
)
def dare_linear(ctx, base, models, p):
    return _LINEAR.merge(ctx, base, models, p)


@register(
    "dare_ties",
    validate=_TIES.validate,
    chunkable=_TIES.chunkable,
    sums=_TIES.sums,
    sum_phases=_TIES.sum_phases,
    finish_sums=_TIES.finish_sums,
    raw_inputs=_TIES.raw_inputs,
    aliases=("dare_ties_merging",),
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    math="tau~_i = Bernoulli(d_i) * tau_i / d_i; then TIES on tau~_i: trim to ties_density (whole model), "
         "gamma = sgn(sum_i tau~_i), theta = theta_0 + lambda * mean of agreeing w_i tau~_i",
    base="required",
    granularity="global",
    params=(
        *_dare_params(),
        G.lambda_param(1.0, "scale of the merged task vector (paper: tuned)"),
        G.Bounded("ties_density", float, 0.2, scope="model", lo=0.0, hi=1.0,
                  help="TIES trim after DARE, fraction kept (MergeLM 0.2; 1 = no trim as in mergekit)"),
        *G.trim_params("global"),
        *G.consensus_params(elect="mass", agg="mean", zero_sign="majority", weighted_elect=False),
        G.int8_mask_param(),
    ),
    stats=_TIES.stats_for,
    mergekit=f"mergekit `dare_ties` = {MERGEKIT_TIES}.",
    mergekit_params={"density": 1.0, "ties_density": 1.0, "rescale": "l1", "weighted_elect": True, "zero_sign": "positive",
                     "normalize": False},
    notes="Default = MergeLM's DARE followed by full TIES (second magnitude trim over the whole model).",
    example={"density": 0.5},
)
def dare_ties(ctx, base, models, p):
    return _TIES.merge(ctx, base, models, p)
