"""RESM: Reweighting-Enhanced task Singular Merging (EXPERIMENTAL reconstruction).

Yang, Jin, Tang, Shen, Zhu, Chen, Zhao, Wang, Cui, Zhang, Zhou, Wu, Kuang, "Mix Data or Merge Models?
Balancing the Helpfulness, Honesty, and Harmlessness of Large Language Model via Model Merging", 2025
(arXiv 2502.06876). No official code was found; the merged models are on the Hub as 3H_Merging.

What the paper states (abstract, model cards): RESM is TSV-M (see :mod:`.tsv`) plus (1) *outlier
weighting*, against the accumulation of preference noise, which shows up as outlier parameters of the
alignment task vectors, and (2) *sparsity-aware rank selection*, because alignment task vectors have very
different sparsity across layers, instead of TSV-M's uniform rank r/N. The exact formulas of Sec. 4 could
not be recovered while writing this module, so the two rules below are OUR documented choices; both can
be switched off, and then RESM equals TSV-M exactly (tested).

Per matrix (2-D tensor not in ``spectral_exclude``), Delta_i = W_i - W_0, r = min(m, n):

1. outlier weighting (OWL-style outlier definition, Yin et al. 2024: |x| > M * mean|x| of the matrix):
   w = min(1, M * mean|Delta_i| / |Delta_i|) element-wise, Delta_i' = w * Delta_i, i.e. outliers are
   down-weighted to the threshold magnitude (sign kept). M = ``outlier_threshold`` (0 = off).
2. sparsity-aware rank: density d_i = fraction of entries with |Delta_i| > ``sparsity_tol`` * max|Delta_i|
   (exact non-zeros by default: bf16 fine-tunes leave many weights unchanged);
   k_i = max(1, floor(r * rank_fraction * d_i / mean_j d_j)), rank_fraction = 1/N by default, so the total
   rank stays about r and denser (more informative) task matrices keep more singular directions.
   ``rank_rule: uniform`` gives TSV-M's k_i = floor(r * rank_fraction).
3. TSV-M on the reweighted matrices with ranks k_i: concatenate the top-k_i triplets, orthogonalise U and
   V by their polar factors, theta = theta_0 + alpha * U_perp S^ V_perp^T.

Other tensors (1-D, 0-D, excluded 2-D) get theta_0 + alpha * mean_i Delta_i, as in TSV-M.
"""
from __future__ import annotations

import torch

from . import _spectral as sp
from .base import MergeError, Param, register
from .kernels import task_vectors


def outlier_reweight(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Down-weight entries with |x| > threshold * mean|x| to that magnitude (sign kept)."""
    if not threshold or threshold <= 0:
        return delta
    cap = threshold * delta.abs().mean()
    if cap <= 0:
        return delta
    return delta.clamp(-cap, cap)


def density(delta: torch.Tensor, tol: float = 0.0) -> float:
    """Fraction of entries with |x| > tol * max|x| (tol = 0: exact non-zeros)."""
    a = delta.abs()
    m = a.max()
    if m <= 0:
        return 0.0
    return float((a > tol * m).float().mean())


def sparsity_ranks(deltas: list[torch.Tensor], r: int, rank_fraction: float | None, rule: str,
                   tol: float = 0.0) -> list[int]:
    """Per-task ranks k_i (see the module docstring)."""
    n = len(deltas)
    frac = 1.0 / n if rank_fraction is None else float(rank_fraction)
    if frac <= 0:
        raise MergeError(f"resm: rank_fraction must be > 0, got {rank_fraction}")
    base_k = r * frac
    if rule == "uniform":
        return [int(base_k + 1e-9)] * n
    ds = [density(d, tol) for d in deltas]
    mean_d = sum(ds) / n
    if mean_d <= 0:
        return [0] * n
    # floor with a tolerance so that e.g. (10/3) * 1.0 / (5/6) gives 4, not 3
    return [0 if di == 0 else min(r, max(1, int(base_k * di / mean_d + 1e-9))) for di in ds]


@register(
    "resm",
    concurrent_tensors=True,  # SVD-bound: several tensors at once on the CPU
    aliases=("reweighting_enhanced_task_singular_merging",),
    paper="Yang et al., Mix Data or Merge Models? Balancing the Helpfulness, Honesty, and Harmlessness of Large "
          "Language Model via Model Merging, 2025 (arXiv 2502.06876)",
    math="per matrix: Delta_i clipped at M*mean|Delta_i| (outlier weighting); rank k_i = r/N * d_i/mean(d) from the "
         "density d_i (sparsity-aware); TSV-M of the reweighted matrices with ranks k_i; theta = theta_0 + alpha * "
         "U_perp diag(S) V_perp^T.  Other tensors: theta_0 + alpha * mean_i Delta_i",
    base="required",
    granularity="spectral",
    params=(
        Param("alpha", float, 1.0, help="scaling of the merged task vector"),
        Param("outlier_threshold", float, 5.0,
              help="M: entries above M * mean|Delta| are down-weighted to it (0 = off)"),
        Param("rank_rule", str, "sparsity", choices=("sparsity", "uniform"),
              help="sparsity: k_i proportional to each task matrix's density; uniform: TSV-M's r/N"),
        Param("rank_fraction", float, None, help="average fraction of the rank kept per task (default 1/N)"),
        Param("sparsity_tol", float, 0.0, help="entries with |x| <= sparsity_tol * max|x| count as zero"),
    ) + sp.spectral_params(),
    chunkable=sp.fallback_chunkable,  # excluded/non-2-D tensors (element-wise mean) stream in row chunks
    mergekit="not in mergekit.",
    notes="EXPERIMENTAL: the paper's exact outlier-weight and rank formulas were not recoverable; the rules used "
          "are documented in the module docstring and docs/methods/spectral.md. outlier_threshold: 0 with "
          "rank_rule: uniform is exactly tsv_m.",
    example={"alpha": 1.0},
)
def resm(ctx, base, models, p):
    alpha = p["alpha"]
    if not sp.is_matrix(ctx.name, base, p["spectral_exclude"]):
        return sp.mean_fallback(base, models, alpha)
    deltas = task_vectors(base, models)
    ks = sparsity_ranks(deltas, min(base.shape), p["rank_fraction"], p["rank_rule"], p["sparsity_tol"])
    if sum(ks) == 0:
        return sp.mean_fallback(base, models, alpha)
    dt = sp.compute_dtype(p)
    gens = [ctx.generator(i) for i in range(len(deltas))]

    def one(i):
        d = outlier_reweight(deltas[i], p["outlier_threshold"])
        return sp.top_svd(d, ks[i], p["svd"], generator=gens[i], niter=p["svd_niter"], dtype=dt)

    blocks = sp.parallel_map(one, range(len(deltas)), enabled=base.device.type == "cpu")
    del deltas  # free the task matrices before the orthogonalisation (the memory peak)
    Us, Ss, Vhs = (list(x) for x in zip(*blocks))
    del blocks
    merged = sp.orthogonal_merge(Us, Ss, Vhs, p["orthogonalize"], consume=True).to(torch.float32)
    return merged.mul_(alpha).add_(base)  # = base + alpha * merged, bit for bit
