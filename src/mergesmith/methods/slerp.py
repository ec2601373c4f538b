"""SLERP: spherical linear interpolation between two models.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used for LLM merging by mergekit
(Goddard et al., arXiv 2403.13257). There is no merging paper.

The tensor is flattened to one vector per model. With v0 = base (the t=0 end, not a common ancestor) and
v1 = the other model, d = <v0/|v0|, v1/|v1|> (norms <= 1e-8 are left unnormalised), Omega = arccos(d):

    slerp(t) = sin((1-t) Omega)/sin(Omega) * v0 + sin(t Omega)/sin(Omega) * v1

The coefficients multiply the unnormalised tensors, so norms are interpolated too. They depend only on
the Gram matrix of (v0, v1) (summed in float64), so big tensors stream in row chunks (``sums``). When |d| > 0.9995
(colinear *or* antipodal) it falls back to lerp (1-t) v0 + t v1. d is clamped to [-1, 1] before arccos.
"""
from __future__ import annotations

from .base import Param, register
from .kernels import gram, slerp_flat

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@register(
    "slerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (as used by mergekit, arXiv 2403.13257)",
    math="v = sin((1-t)W)/sin(W) base + sin(tW)/sin(W) model, W = angle of the flattened tensors; |cos W| > 0.9995 -> lerp",
    base="required",
    granularity="tensor",
    params=(
        Param("t", float, required=True, help="interpolation factor: 0 = base model, 1 = the other model"),
    ),
    min_models=1,
    max_models=1,
    mergekit="identical to mergekit `slerp` (base_model is the t=0 end; t may be a per-layer gradient).",
    notes="the base is only an endpoint, not a common ancestor; exactly one other model.",
    example={"t": 0.5},
    sums=lambda ctx, base, models, p: gram([base, models[0]]),
)
def slerp(ctx, base, models, p):
    g = ctx.sums if ctx.sums is not None else gram([base, models[0]])
    return slerp_flat(float(p["t"]), base, models[0], g, DOT_THRESHOLD, EPS, out=base if ctx.owned else None)
