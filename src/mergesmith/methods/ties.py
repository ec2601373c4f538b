"""TIES-Merging: TrIm, Elect Sign & Merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023 (arXiv 2306.01708); official code prateeky2806/ties-merging.

    tau_i   = theta_i - theta_0
    trim    tau_i <- tau_i * 1[|tau_i| >= t_i],  t_i = (P - floor(k_i P))-th smallest |tau_i|
    elect   gamma = sgn(sum_i tau_i); gamma = 0 -> sgn(sum_p gamma_p)  (the global majority sign)
    merge   tau_m = sum_i w_i tau_i [sgn tau_i = gamma] / max(1, #{i: sgn tau_i = gamma, tau_i != 0})
    theta   = theta_0 + lambda * tau_m

Defaults follow the paper/official code: k = 20 % kept (``density: 0.2``), lambda = 1 (the no-validation
default), ``scope: global`` (P = every merged parameter of the model; exact two-pass streaming
selection, see ``_gta_stats``), dis-mean, mass election, global-majority fallback for zero signs.
Where the paper says "top-k%" the official code keeps ``|tau| >= kthvalue(P - floor(kP))``, i.e.
floor(kP)+1 entries plus ties; we follow the code. Per-model ``weight`` (not in the paper) scales each
trimmed vector in the merge step after the election, as PEFT does.

mergekit's ``ties`` = ``scope: tensor, exact_topk: true, weighted_elect: true, zero_sign: positive,
normalize: true`` (per-tensor exact top-k, weights applied before the election, weighted mean over
agreeing models, elected sign 0 -> +1). Give ``density`` explicitly (mergekit's default is 1).
"""
from __future__ import annotations

from . import _gta as G
from .base import register

_PIPE = G.Pipeline("ties", trim="density", consensus=True, trim_rescale=True)

MERGEKIT = "scope: tensor, exact_topk: true, weighted_elect: true, zero_sign: positive, normalize: true"


@register(
    "ties",
    validate=_PIPE.validate,
    chunkable=_PIPE.chunkable,
    raw_inputs=_PIPE.raw_inputs,
    aliases=("ties_merging", "ties-merging"),
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv 2306.01708)",
    math="trim tau_i to |tau_i| >= t_i (top-k per model, whole model); gamma = sgn(sum_i tau_i) (0 -> global "
         "majority); theta = theta_0 + lambda * sum_i w_i tau_i[agree] / #agree",
    base="required",
    granularity="global",
    params=(
        G.density_param(0.2, "fraction k of |tau_i| kept by the trim (paper: top 20%)"),
        G.weight_param(),
        G.lambda_param(1.0, "scale of the merged task vector (paper: tuned on validation; 1.0 without)"),
        *G.trim_params("global"),
        *G.consensus_params(elect="mass", agg="mean", zero_sign="majority", weighted_elect=False),
        G.rescale_param("none", ("none", "l1", "l2"), "match the norm of the untrimmed tensor after the trim"),
        G.int8_mask_param(),
    ),
    stats=_PIPE.stats_for,
    sums=_PIPE.sums,
    sum_phases=_PIPE.sum_phases,
    finish_sums=_PIPE.finish_sums,
    mergekit=f"mergekit `ties` = {MERGEKIT}; set density explicitly (mergekit's default is 1.0).",
    mergekit_params={"density": 1.0, "scope": "tensor", "exact_topk": True, "weighted_elect": True, "zero_sign": "positive",
                     "normalize": True},
    notes="scope: global runs up to three streaming statistics passes (thresholds, majority sign) before merging.",
    example={"density": 0.5},
)
def ties(ctx, base, models, p):
    return _PIPE.merge(ctx, base, models, p)
