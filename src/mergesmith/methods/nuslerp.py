"""NuSLERP: weight-parameterised SLERP of two models, optionally in task-vector space.

mergekit `nuslerp` (Goddard et al., arXiv 2403.13257); with a base it is the task-vector SLERP used by
WARP (Rame et al., "WARP: On the Benefits of Weight Averaged Rewarded Policies", arXiv 2406.16768).

With per-model weights w_1, w_2: t = w_2 / (w_1 + w_2)  (t = 0.5 when |w_1 + w_2| < 1e-6).

* no base:   theta = slerp(t; theta_1, theta_2)
* with base: theta = theta_0 + slerp(t; theta_1 - theta_0, theta_2 - theta_0)

slerp is exact: only vectors with sin(Omega) < 1e-8 (exactly colinear/antipodal) fall back to lerp (no
0.9995 threshold, unlike `slerp`). Granularity: the flattened tensor (``nuslerp_flatten``, default), or
one SLERP per vector. As in mergekit, without flattening the vectors lie along the *last* dim (each
row of a [out, in] matrix); ``nuslerp_row_wise: true`` takes them along dim 0 (each column) instead.
Tensors with fewer than 2 dims are always flattened.
Flattened, the SLERP needs only the Gram matrix of the two vectors; per column (row_wise), only column
sums of squares and products: both add up over row chunks, so big tensors stream (``sums``).
"""
from __future__ import annotations

import torch

from .base import Param, register
from .kernels import gram, slerp_coefficients, slerp_flat
from .kernels import slerp as slerp_kernel

EPS = 1e-8


def interpolation_factor(w1: float, w2: float) -> float:
    s = w1 + w2
    return 0.5 if abs(s) < 1e-6 else w2 / s


def _pair(base, models, inplace: bool = False):
    """The two vectors: task vectors (overwriting the inputs when ``inplace``) or the models."""
    a, b = models
    if base is None:
        return a, b
    return (a.sub_(base), b.sub_(base)) if inplace else (a - base, b - base)


def _sums(ctx, base, models, p):
    if p["nuslerp_flatten"] or models[0].dim() < 2:
        return gram(models, base)  # Gram of the pair, without forming the task vectors
    a, b = _pair(base, models)
    if p["nuslerp_row_wise"]:  # per column: sum over rows of a^2, b^2, a*b (float64)
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return torch.stack([(a2 * a2).sum(0, dtype=torch.float64), (b2 * b2).sum(0, dtype=torch.float64),
                            (a2 * b2).sum(0, dtype=torch.float64)])
    return None  # per row: row chunks are independent


def _chunkable(p, name, shape) -> bool:
    return len(shape) >= 2 and not p["nuslerp_flatten"] and not p["nuslerp_row_wise"]


@register(
    "nuslerp",
    paper="mergekit NuSLERP (Goddard et al., arXiv 2403.13257); task-vector SLERP as in WARP (arXiv 2406.16768)",
    math="t = w2/(w1+w2); theta = slerp(t; theta1, theta2), or theta0 + slerp(t; tau1, tau2) with a base",
    base="optional",
    granularity="tensor",
    params=(
        Param("weight", float, 1.0, scope="model", help="per-model weight; t = w2/(w1+w2)"),
        Param("nuslerp_flatten", bool, True, help="SLERP the whole flattened tensor"),
        Param("nuslerp_row_wise", bool, False, help="when not flattened: vectors along dim 0 instead of the last dim"),
    ),
    min_models=2,
    max_models=2,
    mergekit="identical to mergekit `nuslerp` (give both models a weight; mergekit requires it, ours defaults to 1).",
    notes="the base, if given, must be a third model; the two others are SLERPed as task vectors.",
    example={"weight": 0.5},
    chunkable=_chunkable,
    sums=_sums,
)
def nuslerp(ctx, base, models, p):
    t = interpolation_factor(p["weight"][0], p["weight"][1])
    if p["nuslerp_flatten"] or models[0].dim() < 2:  # coefficients from the Gram matrix; owned inputs take the result
        s = ctx.sums if ctx.sums is not None else _sums(ctx, base, models, p)
        return slerp_flat(t, models[0], models[1], s, 1.0, EPS, base=base, out=models[0] if ctx.owned else None)
    s = None
    if p["nuslerp_row_wise"]:  # before the inputs become task vectors
        s = ctx.sums if ctx.sums is not None else _sums(ctx, base, models, p)
    a, b = _pair(base, models, inplace=ctx.owned)
    shape = a.shape
    if s is not None:
        c0, c1 = slerp_coefficients(t, s[0].sqrt(), s[1].sqrt(), s[2], 1.0, EPS)  # one pair per column
        a2, b2 = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
        out = (a2 * c0.to(a.dtype)).addcmul_(b2, c1.to(a.dtype)).reshape(shape)
    else:
        out = slerp_kernel(t, a, b, 1.0, EPS)
    return out.add_(base) if base is not None else out
