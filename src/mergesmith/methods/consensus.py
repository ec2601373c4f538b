"""Consensus Merging on top of Task Arithmetic and TIES, built from TALL masks.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024 (arXiv 2405.07813); official code nik-dim/tall_masks.

tau_i   = theta_i - theta_0;  tau_MTL = the base merge's (unscaled) task vector:
          sum_i tau_i (consensus_ta) or TIES (top-k trim, elected sign, disjoint sum; consensus_ties)
TALL    m_t = [ |tau_t| >= lambda_t |tau_MTL - tau_t| ]            (per task, element-wise)
count   c = sum_t m_t;  consensus mask m = [c >= k]
merge   theta = theta_0 + lambda * m * tau_MTL

k = 2 drops "catastrophic" (c = 0) and "selfish" (c = 1) weights; k = 0 gives the base merge back; k > N
gives theta_0. Masks are taken against the unscaled tau_MTL, as in the paper.

Strict vs non-strict: the paper writes the mask with ``>=``; the official code uses ``>``. We follow
the paper (``strict=false``); ``strict=true`` reproduces the code. They differ only where
|tau_t| = lambda_t |tau_MTL - tau_t| exactly, e.g. coordinates where every tau is 0 (where tau_MTL is
0 too, so the merge is the same).

lambda_t: the paper picks each task's lambda_t from {0.2, ..., 0.6} on validation data; without data
we use one fixed value (``mask_lambda``, default 0.5; FusionBench uses 0.6), per model if wanted.
"""
from __future__ import annotations

import torch

from . import _fused as _F
from . import _gta as G
from .base import Param, Params, register
from .kernels import tall_masks, task_vectors

CONSENSUS_PARAMS = (
    Param("lambda", float, 1.0, help="scale of the consensus task vector (paper: tuned in 0.1..1.0)"),
    Param("k", int, 2, help="keep coordinates used by at least k tasks' TALL masks"),
    Param("mask_lambda", float, 0.5, scope="model", help="TALL mask threshold lambda_t (paper: 0.2..0.6 on validation)"),
    Param("strict", bool, False, help="use > instead of the paper's >= in the TALL mask (official code)"),
)


def consensus_delta(d: torch.Tensor, merged: torch.Tensor, p) -> torch.Tensor:
    """m * tau_MTL for stacked task vectors d [N, ...] and the base merge's task vector."""
    masks = tall_masks(d, merged, p["mask_lambda"], p["strict"])
    return merged * (masks.sum(0) >= p["k"])


def consensus_ta_delta(ctx, base, models, p) -> torch.Tensor:
    d = torch.stack(task_vectors(base, models))
    return consensus_delta(d, d.sum(0), p)


@register(
    "consensus_ta",
    aliases=("consensus", "consensus_task_arithmetic", "consensus_merging"),
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024 (arXiv 2405.07813)",
    math=(
        "tau = sum_i tau_i;  m_t = [|tau_t| >= lambda_t |tau - tau_t|];\n"
        "theta = theta_0 + lambda * [sum_t m_t >= k] * tau"
    ),
    base="required",
    granularity="element",
    min_models=2,
    params=CONSENSUS_PARAMS,
    raw_inputs=G.fused_shape,
    mergekit="not in mergekit; k=0 gives mergekit's task_arithmetic (weights 1).",
    example={"k": 2, "lambda": 0.5},
)
def consensus_ta(ctx, base, models, p):
    if G.fused_inputs(base, models):  # the float32 operations of the torch path in its order (bit-identical, tested)
        lams = [float(x) for x in p["mask_lambda"]]
        return G.kernel_blocks([base, *models], ctx.out_dtype, lambda xs, out: _F.consensus_ta(
            xs[1:], xs[0], lams, p["k"], p["strict"], p["lambda"], out))
    if ctx.raw:  # handed as stored (raw_inputs) but not for the kernel: float32 copies
        ctx, base, models = G.float32_inputs(ctx, base, models)
    return base + p["lambda"] * consensus_ta_delta(ctx, base, models, p)


# TIES (k = 20 %, elected sign, disjoint *sum* as in the official TALL code) through the shared GTA
# pipeline, including its exact streaming whole-model trim thresholds for scope: global. The global
# majority sign comes from the statistics pass (defer_sign=False): the engine's after-the-fact patch
# would write TIES values where the consensus output belongs.
_TIES = G.Pipeline("consensus_ties", trim="density", consensus=True, defer_sign=False)


def ties_delta(ctx, base, models, p) -> torch.Tensor:
    """The unscaled TIES task vector. The pipeline runs on (0, tau_i) so the result is exactly delta."""
    q = Params(p)
    q["lambda"] = 1.0
    return _TIES.merge(ctx, torch.zeros_like(base), [m - base for m in models], q)


def consensus_ties_delta(ctx, base, models, p) -> torch.Tensor:
    d = torch.stack(task_vectors(base, models))
    return consensus_delta(d, ties_delta(ctx, base, models, p), p)


@register(
    "consensus_ties",
    validate=_TIES.validate,
    aliases=("consensus_ties_merging",),
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024 (arXiv 2405.07813)",
    math=(
        "tau = TIES(tau_1..tau_N) (top-k trim, elected sign, disjoint sum);  m_t = [|tau_t| >= lambda_t |tau - tau_t|];\n"
        "theta = theta_0 + lambda * [sum_t m_t >= k] * tau"
    ),
    base="required",
    granularity="global",
    min_models=2,
    params=(
        G.density_param(0.2, "TIES: fraction of |tau_i| kept by the trim (paper: top 20%)"),
        G.weight_param(),
        *CONSENSUS_PARAMS,
        *G.trim_params("global"),
        *G.consensus_params(elect="mass", agg="sum", zero_sign="majority", weighted_elect=False),
    ),
    stats=_TIES.stats_for,
    chunkable=_TIES.chunkable,  # masks and TIES are per element given the whole-model statistics
    mergekit="not in mergekit; k=0 gives `ties` with agg: sum (see `mergesmith methods ties` for mergekit's settings).",
    notes="scope: global runs the TIES statistics passes (exact streamed thresholds) first.",
    example={"k": 2, "lambda": 0.5, "density": 0.5},
)
def consensus_ties(ctx, base, models, p):
    return base + p["lambda"] * consensus_ties_delta(ctx, base, models, p)
