"""Weighted linear averaging / model soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (arXiv 2203.05482).

theta = sum_i w_i theta_i / sum_i w_i   (normalize=True, the default)
theta = sum_i w_i theta_i               (normalize=False)

A listed base model is treated as one more input (as mergekit does). Sum of weights 0 with
normalize=True is an error (mergekit silently divides by zero).
"""
from __future__ import annotations

import torch

from .base import MergeError, Param, register


@register(
    "linear",
    aliases=("average", "simple_average", "model_soup", "weighted_average"),
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    math="theta = sum_i w_i theta_i / sum_i w_i  (or the plain weighted sum when normalize=false)",
    base="none",
    granularity="element",
    params=(
        Param("weight", float, 1.0, scope="model", help="per-model weight"),
        Param("normalize", bool, True, help="divide by the sum of weights"),
    ),
    mergekit="identical to mergekit `linear` (give every model a weight).",
)
def linear(ctx, base, models, p):
    w = p["weight"]
    out = torch.zeros_like(models[0])
    for wi, m in zip(w, models):
        out.add_(m, alpha=wi)
    if p["normalize"]:
        total = sum(w)
        if abs(total) < 1e-12:
            raise MergeError("linear: the weights sum to 0 with normalize=true; set normalize: false or change the weights")
        out.div_(total)
    return out
