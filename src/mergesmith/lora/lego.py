"""LoRA-LEGO: merge LoRAs by clustering their rank-wise Minimal Semantic Units.

Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering", ICLR 2025 (arXiv 2409.16167).

An MSU is one rank component (b_j, a_j) = (B[:, j], A[j, :]); ΔW = Σ_j b_j a_j^T, so MSUs can be permuted
and concatenated freely. Per module:

1. pool the MSUs of all adapters, folding c_i = w_i s_i into b (so every MSU is on the same scale);
2. canonical sign: (b, a) and (-b, -a) are the same update; flip each MSU so the largest |a| entry is > 0;
3. k-means (``rank`` = K clusters, default the largest input rank r; ``lego_iters`` Lloyd iterations;
   initial centroids K distinct pool points drawn from the seeded generator) on the features
   [a/|a|_2 ; b/|b|_2];
4. each non-empty cluster's centroid MSU mu = mean of its members' raw vectors [a; b] (empty clusters are
   dropped, so the output rank may be below K);
5. parameter reweighting (norm decay): mu <- mu * mean_m |m| / |mu|, with the max-abs norm (``linf``,
   default) or ``l2``; output reweighting (variance expansion): ΔW' = sqrt(r / K') Σ_c b_c a_c^T, with K'
   the number of centroids.

With K >= the pool size every MSU is its own cluster (concatenation plus output reweighting); one adapter
with K = r gives back its ΔW exactly.

The paper's full text was not available offline; steps 2-5 follow our team spec (methods_datafree.md
§16.1), itself checked against a third-party re-implementation. The sign canonicalisation (2) and the
choice of r for heterogeneous ranks (the largest input rank) are our additions.
"""
from __future__ import annotations

import torch

from ..methods.base import TensorContext
from .adapter import Factors


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on the rows of x; returns the cluster index of every row. Empty clusters keep
    their previous centroid. Stops early when assignments no longer change."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, centroids).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return assign


def _norm(v: torch.Tensor, kind: str) -> torch.Tensor:
    return v.abs().amax(dim=-1) if kind == "linf" else torch.linalg.vector_norm(v, dim=-1)


def lego_merge(opts, name: str, inputs: list[Factors | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged factors (A' K' x in, B' out x K') of one module; scaling 1."""
    idx = [i for i, f in enumerate(inputs) if f is not None]
    r = max(inputs[i].rank for i in idx)
    k = int(opts.rank or r)
    a = torch.cat([inputs[i].A for i in idx], dim=0)  # [M, in]
    b = torch.cat([inputs[i].B.T * (opts.weights[i] * inputs[i].scale) for i in idx], dim=0)  # [M, out]
    lead = a.abs().argmax(dim=1)
    flip = torch.where(a.gather(1, lead[:, None]).squeeze(1) < 0, -1.0, 1.0)[:, None]
    a, b = a * flip, b * flip
    eps = 1e-12
    feats = torch.cat([a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(eps),
                       b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(eps)], dim=1)
    gen = TensorContext(name=name, seed=opts.seed).generator(0)
    assign = kmeans(feats, k, opts.lego_iters, gen)
    raw = torch.cat([a, b], dim=1)  # [M, in + out]
    units = []
    for c in torch.unique(assign):  # sorted cluster ids
        members = raw[assign == c]
        mu = members.mean(dim=0)
        if opts.lego_norm != "none":
            target = _norm(members, opts.lego_norm).mean()
            have = _norm(mu, opts.lego_norm)
            if have > eps:
                mu = mu * (target / have)
        units.append(mu)
    mus = torch.stack(units)
    n_in = a.shape[1]
    A, B = mus[:, :n_in], mus[:, n_in:].T
    if opts.lego_output_reweight:
        B = B * (r / mus.shape[0]) ** 0.5
    return A.contiguous(), B.contiguous()
