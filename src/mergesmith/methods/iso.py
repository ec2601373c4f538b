"""Isotropic merging: Iso-C and Iso-CTS.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959); official code
danielm1405/iso-merging.

Iso-C, per matrix (2-D tensor not in ``spectral_exclude``), Delta_TA = sum_i Delta_i = U S V^T:

    theta = theta_0 + alpha * sigma_bar U V^T,   sigma_bar = mean_j S_j   (j = 1..r, r = min(m, n))

i.e. the task-arithmetic matrix with a flat ("isotropic") spectrum. With one model this is its own
polar factor scaled by its mean singular value. ``rank_tol`` (our option, off by default = paper) keeps
only directions with S_j > rank_tol * S_1 and averages over those (for low-rank/LoRA deltas, where
the directions of zero singular values are numerical noise).

Iso-CTS, per matrix:

    k_c = floor(f r), then k_c = r - N * round((r - k_c) / N)   (task part divisible by N), s = (r - k_c) / N
    common: the top k_c triplets (U_c, S_c, V_c) of Delta_TA
    task-specific: the top s triplets of Delta_i - U_c U_c^T Delta_i, for each i
    U^ = [U_c | U_1 | ... | U_N], V^ likewise, both replaced by their polar factors
    theta = theta_0 + alpha * sigma_bar U_perp V_perp^T,  sigma_bar = mean of the r concatenated S

f = common_space_fraction = 0.8. f = 1 gives Iso-C; r < N leaves s = 0 (Iso-C on the common part).

Every other tensor (1-D, 0-D, excluded 2-D: embeddings, lm_head) gets theta_0 + alpha * mean_i Delta_i
(official code).
"""
from __future__ import annotations

import torch

from . import _spectral as sp
from .base import MergeError, Param, register
from .kernels import task_vectors


def _sum(deltas):
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out


def iso_c_matrix(delta_sum: torch.Tensor, *, svd: str = "gram", dtype=torch.float32,
                 rank_tol: float | None = None) -> torch.Tensor:
    """sigma_bar U V^T of a 2-D matrix (float32 out)."""
    U, S, Vh = sp.full_svd(delta_sum, "gram" if svd == "gram" else "exact", dtype)
    if rank_tol:
        keep = S > rank_tol * S[0]
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
    if S.numel() == 0:
        return torch.zeros_like(delta_sum, dtype=torch.float32)
    return (U @ Vh).mul_(S.mean()).to(torch.float32)


def common_space_size(r: int, n_models: int, fraction: float) -> tuple[int, int]:
    """(k_c, s) of Iso-CTS, following the official rounding; k_c + N*s = r."""
    k_c = int(r * fraction)
    ts = round((r - k_c) / n_models) * n_models
    if ts > r:  # tiny r with a small fraction: keep the task part within the rank
        ts = (r // n_models) * n_models
    k_c = r - ts
    return k_c, ts // n_models


def iso_cts_matrix(deltas: list[torch.Tensor], fraction: float, *, svd: str = "gram", niter: int = 2,
                   orthogonalize: str = "eigh", dtype=torch.float32, generators=None) -> torch.Tensor:
    """The Iso-CTS merged task matrix (float32 out)."""
    n_models = len(deltas)
    r = min(deltas[0].shape)
    k_c, s = common_space_size(r, n_models, fraction)
    # only the common triplets must be accurate: the rest of U is used as a basis of their complement
    U, S, Vh = sp.full_svd(_sum(deltas), "gram" if svd == "gram" else "exact", dtype, accurate=k_c)
    Uc, Sc, Vhc = U[:, :k_c], S[:k_c], Vh[:k_c]
    Us, Ss, Vhs = [Uc], [Sc], [Vhc]
    m, n = deltas[0].shape
    # when m <= n the thin U of the sum is an orthonormal basis of R^m (exact and gram modes), so
    # Delta_i - U_c U_c^T Delta_i = U_perp (U_perp^T Delta_i) with U_perp = U[:, k_c:], and its SVD is that of
    # the small (m - k_c) x n matrix lifted by U_perp (same result, far cheaper)
    complement = U[:, k_c:] if m <= n else None

    def task(i):
        d = deltas[i].to(dtype)
        g = generators[i] if generators is not None else None
        if complement is not None:
            Ui, Si, Vhi = sp.top_svd(complement.mT @ d, s, svd, generator=g, niter=niter, dtype=dtype)
            return complement @ Ui, Si, Vhi
        return sp.top_svd(d - Uc @ (Uc.mT @ d), s, svd, generator=g, niter=niter, dtype=dtype)

    if s > 0:  # independent task-specific SVDs: concurrently, one single-threaded LAPACK call each
        for Ui, Si, Vhi in sp.parallel_map(task, range(n_models), enabled=U.device.type == "cpu"):
            Us.append(Ui), Ss.append(Si), Vhs.append(Vhi)
    del deltas, complement, U, Uc, Vh, Vhc  # drop our references before the orthogonalisation (memory peak)
    # the task blocks lie in the complement of U_c (both routes above), so polar(U^) = [U_c | polar(tasks)]
    return sp.orthogonal_merge(Us, Ss, Vhs, orthogonalize, isotropic=True, consume=True,
                               u_orthonormal_head=True).to(torch.float32)


_COMMON = (
    Param("alpha", float, 1.0, help="scaling (paper: swept 0.1..3.0 on validation; 1.0-1.5 without validation)"),
)


@register(
    "iso_c",
    concurrent_tensors=True,  # SVD-bound: several tensors at once on the CPU
    aliases=("iso", "isotropic", "iso_c_merge", "isotropic_merging"),
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025 (arXiv 2502.04959)",
    math="per matrix: sum_i Delta_i = U S V^T; theta = theta_0 + alpha * mean(S) U V^T. Other tensors: "
         "theta_0 + alpha * mean_i Delta_i",
    base="required",
    granularity="spectral",
    params=_COMMON + (
        Param("rank_tol", float, None, help="keep only S_j > rank_tol * S_1 (our option for low-rank deltas; "
                                            "off = paper)"),
    ) + sp.spectral_params(svd_modes=("gram", "exact"), orthogonalize=False),
    chunkable=sp.fallback_chunkable,  # excluded/non-2-D tensors (element-wise mean) stream in row chunks
    mergekit="not in mergekit. FusionBench `ISO_C_Merge` = defaults with spectral_exclude: ''.",
    notes="fallback for non-matrices and excluded tensors: mean of the task vectors (official). svd=gram (default) "
          "takes the polar factor from the Gram eigendecomposition when the sum is within 10x of orthogonal "
          "(e.g. tall matrices), LAPACK otherwise; svd=exact always uses LAPACK.",
    example={"alpha": 1.0},
)
def iso_c(ctx, base, models, p):
    alpha = p["alpha"]
    tol = p["rank_tol"]
    if tol is not None and not 0 <= tol < 1:
        raise MergeError(f"iso_c: rank_tol must lie in [0, 1), got {tol}")
    if not sp.is_matrix(ctx.name, base, p["spectral_exclude"]):
        return sp.mean_fallback(base, models, alpha)
    merged = iso_c_matrix(sp.delta_sum(base, models), svd=p["svd"], dtype=sp.compute_dtype(p), rank_tol=tol)
    return merged.mul_(alpha).add_(base)  # = base + alpha * merged, bit for bit, one buffer fewer


@register(
    "iso_cts",
    concurrent_tensors=True,  # SVD-bound: several tensors at once on the CPU
    aliases=("iso_cts_merge",),
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025 (arXiv 2502.04959)",
    math="per matrix: common top-k_c triplets of sum_i Delta_i + top-s triplets of each Delta_i with the common "
         "left subspace removed; U, V orthogonalised (polar); theta = theta_0 + alpha * mean(S) U_perp V_perp^T. "
         "Other tensors: theta_0 + alpha * mean_i Delta_i",
    base="required",
    granularity="spectral",
    params=_COMMON + (
        Param("common_space_fraction", float, 0.8, help="fraction f of the rank given to the common subspace"),
    ) + sp.spectral_params(),
    chunkable=sp.fallback_chunkable,  # excluded/non-2-D tensors (element-wise mean) stream in row chunks
    mergekit="not in mergekit. FusionBench `ISO_CTS_Merge` = defaults with spectral_exclude: ''.",
    notes="fallback for non-matrices and excluded tensors: mean of the task vectors (official). Speed: the defaults "
          "svd=gram, orthogonalize=eigh use Gram eigendecompositions where the spectrum allows float32 accuracy "
          "and LAPACK elsewhere (docs/methods/spectral.md); svd=exact, orthogonalize=svd always use LAPACK; "
          "svd=randomized applies to the small task-specific SVDs only.",
    example={"alpha": 1.0, "common_space_fraction": 0.8},
)
def iso_cts(ctx, base, models, p):
    alpha = p["alpha"]
    f = p["common_space_fraction"]
    if not 0 < f <= 1:
        raise MergeError(f"iso_cts: common_space_fraction must lie in (0, 1], got {f}")
    if not sp.is_matrix(ctx.name, base, p["spectral_exclude"]):
        return sp.mean_fallback(base, models, alpha)
    merged = iso_cts_matrix(
        task_vectors(base, models), f, svd=p["svd"], niter=p["svd_niter"], orthogonalize=p["orthogonalize"],
        dtype=sp.compute_dtype(p), generators=[ctx.generator(i) for i in range(len(models))],
    )
    return merged.mul_(alpha).add_(base)
