"""Karcher (Frechet) mean of the models on the unit hypersphere.

Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 1977; Buss & Fillmore, "Spherical
averages and applications to spherical splines and interpolation", ACM TOG 2001 (the fixed-point
iteration). mergekit `karcher` cites "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold".

Each input tensor is flattened, x_i = |x_i| u_i, with equal weights a_i = 1/N. Inputs with |x_i| <= tol
are left out of the direction (their weight is renormalised over the others). Starting from
mu = normalize(sum a_i u_i), repeat up to ``max_iter`` times:

    theta_i = arccos <mu, u_i>,   T = sum a_i theta_i / sin(theta_i) (u_i - cos(theta_i) mu)
    stop if |T| < tol,  else mu <- normalize(cos|T| mu + sin|T| T/|T|)

Output: (sum_i |x_i| / N) mu. Terms with theta_i < tol (already at mu) or sin(theta_i) < 1e-8
(antipodal to mu, direction undefined) are skipped. The base model, when given, is one more equal
input (``include_base``, as in mergekit).

mu and the tangent T always lie in the span of the inputs, so the iteration runs on coefficient
vectors (mu = sum_j m_j u_j) with the Gram matrix G_ij = <x_i, x_j> in float64: <mu, u_i> = (G_u m)_i
and |T|^2 = t^T G_u t. The same steps as iterating on the flattened vectors (mergekit), in N dimensions;
big tensors stream (``sums``: G is additive over row chunks) and the output is one combination
sum_i c_i x_i.
"""
from __future__ import annotations

import math

import torch

from .base import Param, register
from .kernels import combination, gram


def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """c with Karcher mean = sum_i c_i x_i, from the Gram matrix ``g`` of the inputs (float64 [N, N])."""
    g = g.to("cpu", torch.float64)
    n = g.shape[0]
    norms = g.diagonal().clamp_min(0).sqrt()
    scale = float(norms.mean())
    keep = torch.nonzero(norms > tol).reshape(-1)
    out = torch.zeros(n, dtype=torch.float64)
    if keep.numel() == 0:
        return out
    nk = norms[keep]
    gu = g[keep][:, keep] / torch.outer(nk, nk)  # Gram of the unit vectors u_i

    def length(v: torch.Tensor) -> float:
        return math.sqrt(max(float(v @ gu @ v), 0.0))

    k = keep.numel()
    a = torch.full((k,), 1.0 / k, dtype=torch.float64)
    m = a.clone()
    mu_norm = length(m)
    if mu_norm < tol:
        m = torch.zeros(k, dtype=torch.float64)
        m[0] = 1.0
    else:
        m = m / mu_norm
    for _ in range(max_iter):
        cos = (gu @ m).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        sin = torch.sin(theta)
        active = (theta >= tol) & (sin.abs() >= 1e-8)
        coef = torch.where(active, a * theta / torch.where(active, sin, torch.ones_like(sin)), torch.zeros_like(sin))
        t = coef - float((coef * cos).sum()) * m
        t_norm = length(t)
        if t_norm < tol:
            break
        m = math.cos(t_norm) * m + (math.sin(t_norm) / t_norm) * t
        m = m / max(length(m), tol)
    out[keep] = scale * m / nk
    return out


def karcher_mean(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5, g: torch.Tensor | None = None,
                 inplace: bool = False) -> torch.Tensor:
    """Equal-weight Karcher mean of tensors of one shape (see module docstring); ``g``: their Gram
    matrix when already known (e.g. summed over row chunks); ``inplace``: the result overwrites xs[0]."""
    if len(xs) == 1:
        return xs[0] if inplace else xs[0].clone()
    c = karcher_coefficients(gram(xs) if g is None else g, max_iter, tol)
    return combination(c.tolist(), xs, out=xs[0] if inplace else None)  # sum_i c_i x_i, in cache-sized blocks


def _inputs(base, models, p) -> list:
    return ([base] if base is not None and p["include_base"] else []) + list(models)


def _sums(ctx, base, models, p):
    return gram(_inputs(base, models, p))


@register(
    "karcher",
    aliases=("karcher_mean", "frechet_mean"),
    paper="Karcher, Riemannian center of mass, CPAM 1977; Buss & Fillmore, Spherical averages, ACM TOG 2001",
    math="mu = argmin_mu sum_i arccos(<mu, u_i>)^2 on the unit sphere (fixed-point iteration); theta = mean_i |x_i| * mu",
    base="optional",
    granularity="tensor",
    params=(
        Param("max_iter", int, 10, help="maximum fixed-point iterations"),
        Param("tol", float, 1e-5, help="stop when the Riemannian gradient norm is below tol; norms <= tol are ignored"),
        Param("include_base", bool, True, help="treat a given base model as one more equal input (mergekit)"),
    ),
    min_models=1,
    mergekit="identical to mergekit `karcher` (a listed base model joins as an equal input).",
    notes="all inputs are weighted equally; no task vectors are formed.",
    example={},
    sums=_sums,
)
def karcher(ctx, base, models, p):
    return karcher_mean(_inputs(base, models, p), max_iter=p["max_iter"], tol=p["tol"], g=ctx.sums, inplace=ctx.owned)
