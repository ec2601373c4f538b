"""Multi-SLERP: one-step barycentric interpolation of N models on the hypersphere.

Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea, 2025), mergekit `multislerp`.
No paper; the construction is the first step of the Buss & Fillmore spherical-average iteration
("Spherical averages and applications to spherical splines and interpolation", ACM TOG 2001).

With x_i the flattened tensors (task vectors x_i - theta_0 when a base is given), weights w_i
(divided by sum w when ``normalize_weights``), the blog's algorithm is

    u_i = x_i / (|x_i| + eps)                mu = m / |m|,  m = sum w_i u_i
    g   = sum w_i (u_i - <u_i, mu> mu)       r  = cos|g| mu + sin|g| g/|g|   (exponential map)
    theta = (sum w_i |x_i|) r  [+ theta_0]

The tangent step vanishes identically: g = m - <m, mu> mu = m - |m| mu = 0, so r = mu and
theta = (sum w_i |x_i|) * normalize(sum w_i u_i): the normalised weighted mean of the directions,
rescaled to the weighted mean norm (mergekit evaluates the exponential map and gets mu up to O(eps)).
If |m| < eps (antipodal inputs that cancel): two models fall back to sum w_i x_i, more models are an
error. For two equal-norm inputs with equal weights the result is slerp(0.5); unequal weights give
normalised-lerp directions, not slerp(t).
Everything but the final combination depends on the Gram matrix G_ij = <x_i, x_j> (|m|^2 = c^T G c with
c_i = w_i / (|x_i| + eps)), so big tensors stream in row chunks (``sums``).
"""
from __future__ import annotations

import torch

from .base import MergeError, Param, register
from .kernels import combination, gram


def _sums(ctx, base, models, p):
    return gram(models, base)  # Gram of the x_i, without forming them


def _check_weights(p) -> None:
    """At planning, per tensor (a weight gradient may reach a zero sum at some layer only)."""
    if p["normalize_weights"] and len(p["weight"]) > 1 and abs(sum(p["weight"])) < 1e-12:
        raise MergeError("multislerp: the weights sum to 0 with normalize_weights=true; change the weights")


@register(
    "multislerp",
    aliases=("multi_slerp",),
    paper="Goddard, Multi-SLERP (goddard.blog, 2025); mergekit `multislerp` (arXiv 2403.13257)",
    math="theta = (sum w_i |x_i|) * normalize(sum w_i x_i/|x_i|)  (the tangent-space step of Multi-SLERP is zero)",
    base="optional",
    granularity="tensor",
    params=(
        Param("weight", float, 1.0, scope="model", help="per-model weight"),
        Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        Param("eps", float, 1e-8, help="numerical floor for norms"),
    ),
    min_models=1,
    mergekit="identical to mergekit `multislerp` up to O(eps) (mergekit requires every weight; ours default to 1).",
    notes="with a base the inputs are task vectors (theta_i - theta_0) and theta_0 is added back.",
    example={},
    sums=_sums,
    validate=_check_weights,
)
def multislerp(ctx, base, models, p):
    if len(models) == 1:
        return models[0].clone()
    eps = p["eps"]
    g = ctx.sums if ctx.sums is not None else _sums(ctx, base, models, p)
    w = torch.tensor(p["weight"], dtype=torch.float64)
    if p["normalize_weights"]:
        total = w.sum()
        if total.abs() < 1e-12:
            raise MergeError("multislerp: the weights sum to 0 with normalize_weights=true; change the weights")
        w = w / total
    g = g.to("cpu", torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    c = w / (norms + eps)  # m = sum_i c_i x_i = sum_i w_i u_i
    mean_norm = float((c @ g @ c).clamp_min(0).sqrt())
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeError(
                f"multislerp: the weighted unit vectors of '{ctx.name}' cancel out (antipodal inputs); change the weights"
            )
        coef = w  # sum_i w_i x_i
    else:
        coef = c * (float(w @ norms) / mean_norm)  # (sum_i w_i |x_i|) * m / |m|: the exponential map of a zero tangent mean
    # sum_i coef_i x_i (+ base), in cache-sized blocks; owned inputs take the result: no full-size temporaries
    return combination(coef.tolist(), models, base, out=models[0] if ctx.owned else None)
