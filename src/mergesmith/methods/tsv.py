"""Task Singular Vectors: TSV-M (merge) and TSV-C (compress).

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodola, "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025 (arXiv 2412.00081); official code AntoAndGar/task_singular_vectors.

TSV-M, per matrix (2-D tensor not in ``spectral_exclude``), with Delta_i = W_i - W_0, r = min(m, n):

    Delta_i ~ U_i,k S_i,k V_i,k^T            k = floor(r * rank_fraction), rank_fraction = 1/N by default
    U^ = [U_1,k | ... | U_N,k],  S^ = diag(S_1,k, ..., S_N,k),  V^ = [V_1,k | ... | V_N,k]
    U_perp = polar(U^) = P Q^T for U^ = P S Q^T   (closest orthonormal matrix), V_perp likewise
    theta = theta_0 + alpha * U_perp S^ V_perp^T

Every other tensor (1-D, 0-D, excluded 2-D such as embeddings and lm_head) gets
``theta_0 + alpha * mean_i Delta_i`` (the official code averages them; alpha applies to every tensor).
Fallbacks we add: a matrix whose k = floor(r * rank_fraction) is 0 (N > r) takes the mean rule instead of
the official code's silent zero. ``rank_fraction = 1`` is the paper's "lossless" variant (k = r per task).

TSV-C: keep the top k = max(1, floor(0.1 r)) triplets of each task matrix and rebuild
``theta_0 + U_k S_k V_k^T`` (needs the task id at inference); :func:`tsv_c_compress` does one matrix,
:func:`tsv_c_state_dict` / :func:`tsv_c_reconstruct` a whole model (tensor by tensor).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from . import _spectral as sp
from .base import MergeError, Param, register
from .kernels import task_vectors


def rank_per_task(r: int, n_models: int, rank_fraction: float | None) -> int:
    """k = floor(r * rank_fraction), rank_fraction defaulting to 1/N (official ``sv_reduction``)."""
    frac = (1.0 / n_models) if rank_fraction is None else float(rank_fraction)
    if frac <= 0:
        raise MergeError(f"tsv_m: rank_fraction must be > 0, got {rank_fraction}")
    return int(r * frac)


def tsv_merge_matrix(deltas: list[torch.Tensor], k: int, *, svd: str = "gram", niter: int = 2,
                     orthogonalize: str = "eigh", dtype: torch.dtype = torch.float32, generators=None) -> torch.Tensor:
    """The TSV-M merged task matrix ``U_perp S^ V_perp^T`` of 2-D task matrices (float32 out)."""
    def one(i):
        g = generators[i] if generators is not None else None
        return sp.top_svd(deltas[i], k, svd, generator=g, niter=niter, dtype=dtype)

    # the per-task SVDs are independent: run concurrently, one single-threaded LAPACK call each
    blocks = sp.parallel_map(one, range(len(deltas)), enabled=deltas[0].device.type == "cpu")
    del deltas  # drop our references before the orthogonalisation (the memory peak)
    Us, Ss, Vhs = (list(x) for x in zip(*blocks))
    del blocks
    return sp.orthogonal_merge(Us, Ss, Vhs, orthogonalize, consume=True).to(torch.float32)


@register(
    "tsv_m",
    concurrent_tensors=True,  # SVD-bound: several tensors at once on the CPU
    aliases=("tsv", "tsvm", "tsv_merge", "task_singular_vectors", "task_singular_vector_merging"),
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
          "(arXiv 2412.00081)",
    math="per matrix: top k = r/N singular triplets of each Delta_i, concatenated; U, V replaced by their polar "
         "factors; theta = theta_0 + alpha * U_perp diag(S) V_perp^T.  Other tensors: theta_0 + alpha * mean_i Delta_i",
    base="required",
    granularity="spectral",
    params=(
        Param("alpha", float, 1.0, help="scaling of the merged task vector (paper: swept 0.1..3.0 on validation; "
                                        "1.0 = FusionBench default)"),
        Param("rank_fraction", float, None, help="fraction of each matrix's rank kept per task (default 1/N; 1 = "
                                                 "lossless variant)"),
    ) + sp.spectral_params(),
    chunkable=sp.fallback_chunkable,  # excluded/non-2-D tensors (element-wise mean) stream in row chunks
    mergekit="not in mergekit. FusionBench `TaskSingularVectorMerging` (alpha=1, exclude_keys) = defaults with "
             "spectral_exclude: ''.",
    notes="fallback for non-matrices and excluded tensors: mean of the task vectors (official). Speed: the defaults "
          "svd=gram, orthogonalize=eigh use Gram eigendecompositions where the spectrum allows float32 accuracy and "
          "LAPACK elsewhere (docs/methods/spectral.md); svd=exact, orthogonalize=svd always use LAPACK.",
    example={"alpha": 1.0},
)
def tsv_m(ctx, base, models, p):
    alpha = p["alpha"]
    if not sp.is_matrix(ctx.name, base, p["spectral_exclude"]):
        return sp.mean_fallback(base, models, alpha)
    k = rank_per_task(min(base.shape), len(models), p["rank_fraction"])
    if k == 0:
        return sp.mean_fallback(base, models, alpha)
    merged = tsv_merge_matrix(
        task_vectors(base, models), k, svd=p["svd"], niter=p["svd_niter"], orthogonalize=p["orthogonalize"],
        dtype=sp.compute_dtype(p), generators=[ctx.generator(i) for i in range(len(models))],
    )
    return merged.mul_(alpha).add_(base)  # = base + alpha * merged, bit for bit, one buffer fewer


# ---------------------------------------------------------------------------------------------------
# TSV-C


def compressed_rank(r: int, rank_fraction: float) -> int:
    """k = max(1, floor(rank_fraction * r)) (at least one triplet, so small matrices keep something)."""
    if not 0 < rank_fraction <= 1:
        raise MergeError(f"rank_fraction must lie in (0, 1], got {rank_fraction}")
    return max(1, int(rank_fraction * r))


def tsv_c_compress(delta: torch.Tensor, rank_fraction: float = 0.1, *, svd: str = "exact", niter: int = 2,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> sp.LowRank:
    """TSV-C of one task matrix: its best rank-k approximation, k = max(1, floor(rank_fraction * r))."""
    k = compressed_rank(min(delta.shape), rank_fraction)
    return sp.low_rank(delta.to(torch.float32), k, svd, generator=generator, niter=niter, dtype=dtype)


def tsv_c_state_dict(base: Any, finetuned: Any, rank_fraction: float = 0.1, *, spectral_exclude: str = "default",
                     svd: str = "exact", niter: int = 2, seed: int = 0) -> dict[str, Any]:
    """TSV-C of a whole model: ``{name: LowRank}`` for matrices, the dense float32 delta for every other
    floating tensor (non-float tensors are skipped). ``base``/``finetuned``: state dict, nn.Module or path;
    read one tensor at a time."""
    from ..io.checkpoint import open_checkpoint
    from .base import TensorContext

    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    out: dict[str, Any] = {}
    for name in b.keys():
        if name not in f or not b.meta(name).dtype.is_floating_point:
            continue
        d = f.get(name).to(torch.float32) - b.get(name).to(torch.float32)
        if sp.is_matrix(name, d, spectral_exclude):
            g = TensorContext(name=name, seed=seed).generator(0)
            out[name] = tsv_c_compress(d, rank_fraction, svd=svd, niter=niter, generator=g)
        else:
            out[name] = d
    return out


def tsv_c_reconstruct(base: Mapping[str, torch.Tensor] | Any, compressed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """theta_0 + (U_k S_k V_k^T or the dense delta) for every compressed tensor; others copied from base."""
    from ..io.checkpoint import open_checkpoint

    b = open_checkpoint(base)
    out = {}
    for name in b.keys():
        t = b.get(name)
        c = compressed.get(name)
        if c is None:
            out[name] = t.clone()
            continue
        d = c.dense() if isinstance(c, sp.LowRank) else c
        out[name] = (t.to(torch.float32) + d.to(torch.float32)).to(t.dtype)
    return out
