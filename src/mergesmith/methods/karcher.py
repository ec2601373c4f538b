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
"""
from __future__ import annotations

import torch

from .base import Param, register


def karcher_mean(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Equal-weight Karcher mean of tensors of one shape (see module docstring)."""
    if len(xs) == 1:
        return xs[0].clone()
    shape = xs[0].shape
    flat = torch.stack([x.reshape(-1) for x in xs])
    norms = torch.linalg.vector_norm(flat, dim=1)
    scale = norms.mean()
    keep = norms > tol
    if not bool(keep.any()):
        return torch.zeros_like(xs[0])
    u = flat[keep] / norms[keep].unsqueeze(1)
    a = torch.full((u.shape[0],), 1.0 / u.shape[0], dtype=u.dtype, device=u.device)
    mu = a @ u
    mu_norm = torch.linalg.vector_norm(mu)
    mu = u[0].clone() if mu_norm < tol else mu / mu_norm
    for _ in range(max_iter):
        cos = (u @ mu).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        sin = torch.sin(theta)
        active = (theta >= tol) & (sin.abs() >= 1e-8)
        coef = torch.where(active, a * theta / torch.where(active, sin, torch.ones_like(sin)), torch.zeros_like(sin))
        tangent = coef @ u - (coef * cos).sum() * mu
        t_norm = torch.linalg.vector_norm(tangent)
        if t_norm < tol:
            break
        mu = torch.cos(t_norm) * mu + torch.sin(t_norm) * (tangent / t_norm)
        mu = mu / torch.linalg.vector_norm(mu).clamp_min(tol)
    return (scale * mu).reshape(shape)


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
)
def karcher(ctx, base, models, p):
    xs = ([base] if base is not None and p["include_base"] else []) + list(models)
    return karcher_mean(xs, max_iter=p["max_iter"], tol=p["tol"])
