"""Twin-Merging, data-free part: the shared expert.

Lu, Fan, Wei, Qu, Chen, Cheng, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", NeurIPS 2024 (arXiv 2406.15479); official code LZY-the-boys/Twin-Merging.

Stage 1 of Twin-Merging builds a shared expert with task arithmetic (official default lambda = 0.29):

    theta* = theta_0 + lambda * sum_i (theta_i - theta_0)

This method writes theta* (element-wise, streams like task_arithmetic). The rest of Twin-Merging needs
the fine-tuned models and task-labelled data at run time and lives in :mod:`mergesmith.experts.twin`:
exclusive knowledge v_t = theta_t - theta* compressed per matrix by truncated SVD (10% of the rank), a
router trained on the user's labelled inputs, and a module that adds sum_t w_t(x) v_t to theta* per input.
Any other shared merge (TIES, TSV-M, ...) can be passed there instead of this one.
"""
from __future__ import annotations

from .base import Param, register


@register(
    "twin_merging",
    aliases=("twin", "twin_shared"),
    paper="Lu et al., Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging, NeurIPS 2024 "
          "(arXiv 2406.15479)",
    math="shared expert theta* = theta_0 + lambda * sum_i (theta_i - theta_0) (the routed exclusive knowledge is "
         "added at inference by mergesmith.experts.twin)",
    base="required",
    granularity="element",
    params=(Param("lambda", float, 0.29, help="task-arithmetic scaling of the shared expert (official 0.29)"),),
    mergekit="the shared expert equals mergekit `task_arithmetic` with weight 0.29 per model.",
    notes="data-free stage only; routing needs labelled inputs (mergesmith.experts.twin.TwinMergedModel).",
    example={"lambda": 0.29},
)
def twin_merging(ctx, base, models, p):
    out = base.clone()
    for m in models:
        out.add_(m - base, alpha=p["lambda"])
    return out
