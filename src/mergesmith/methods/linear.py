"""Weighted linear averaging / model soups.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (arXiv 2203.05482).

theta = sum_i w_i theta_i / sum_i w_i   (normalize=True, the default)
theta = sum_i w_i theta_i               (normalize=False)

A listed base model is treated as one more input (as mergekit does). Sum of weights 0 with
normalize=True is an error (mergekit silently divides by zero).

float32 arithmetic in a fixed order: acc = 0, then acc = fma(theta_i, w_i, acc) per model (one rounding per
model: a fused multiply-add, as torch's ``add_(alpha=)`` and mergekit's ``addcmul_`` on the CPU, so the
result equals mergekit 0.1.5's bit for bit), then the division. Tensors of two blocks or more run block by
block on the kernel threads from the stored bits (``_fused.linear``, the same operations; bf16 bits widened
in its loop), writing bf16 output directly.
"""
from __future__ import annotations

import torch

from . import _fused as _F
from . import _gta as G
from .base import MergeError, Param, register


def _check_weights(p) -> None:
    """At planning, per tensor (a weight gradient may reach a zero sum at some layer only)."""
    if p["normalize"] and abs(sum(p["weight"])) < 1e-12:
        raise MergeError("linear: the weights sum to 0 with normalize=true; set normalize: false or change the weights")


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
    raw_inputs=G.fused_shape,
    validate=_check_weights,
)
def linear(ctx, base, models, p):
    w = p["weight"]
    total = None
    if p["normalize"]:
        _check_weights(p)
        total = sum(w)
    if G.fused_inputs(models[0], models):
        return G.kernel_blocks(models, ctx.out_dtype, lambda xs, out: _F.linear(xs, w, total, out))
    if ctx.raw:  # handed as stored (raw_inputs) but not for the kernel: float32 copies
        models = [m.to(torch.float32) for m in models]
    out = torch.zeros_like(models[0])
    for wi, m in zip(w, models):
        out.add_(m, alpha=wi)  # a fused multiply-add on the CPU (mergekit's addcmul_ too)
    if total is not None:
        out.div_(total)
    return out
