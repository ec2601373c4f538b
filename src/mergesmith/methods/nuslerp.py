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
"""
from __future__ import annotations

from .base import Param, register
from .kernels import slerp as slerp_kernel

EPS = 1e-8


def interpolation_factor(w1: float, w2: float) -> float:
    s = w1 + w2
    return 0.5 if abs(s) < 1e-6 else w2 / s


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
)
def nuslerp(ctx, base, models, p):
    t = interpolation_factor(p["weight"][0], p["weight"][1])
    a, b = models
    if base is not None:
        a, b = a - base, b - base
    shape = a.shape
    if p["nuslerp_flatten"] or a.dim() < 2:
        out = slerp_kernel(t, a.reshape(1, -1), b.reshape(1, -1), 1.0, EPS).reshape(shape)
    elif p["nuslerp_row_wise"]:
        out = slerp_kernel(t, a.movedim(0, -1), b.movedim(0, -1), 1.0, EPS).movedim(-1, 0)
    else:
        out = slerp_kernel(t, a, b, 1.0, EPS)
    return out + base if base is not None else out
