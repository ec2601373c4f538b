"""Shared spectral helpers for TSV-M/TSV-C, Iso-C/Iso-CTS, Twin-Merging and RESM.

Not a method module (the registry skips names starting with ``_``). What lives here:

* ``spectral_exclude``: which tensors are SVD'd. A tensor is a *matrix* when it is 2-D and its name
  matches none of the exclusion regexes (``re.search``). The option is one string of regexes separated
  by ``;``; the word ``default`` stands for :data:`DEFAULT_EXCLUDE` (embeddings, GPT-2 ``wte``/``wpe``,
  T5 ``shared``, ``lm_head`` and CLIP's ``text_projection``, which the official TSV/Iso code skips).
  An empty string excludes nothing but non-2-D tensors. (A YAML *list* would be read as a per-layer
  gradient by the recipe resolver, hence one string.)
* thin SVD on the tall orientation (LAPACK's divide-and-conquer SVD is ~2x slower on wide matrices on
  CPU), truncated SVD by three routes (``gram``, the default: eigendecomposition of the smaller Gram
  matrix, ~2.5x cheaper than LAPACK's SVD, used only where the needed singular values lie within
  ``GUARD_KAPPA`` = 10 of the largest (float32), because the Gram squares the condition number; LAPACK
  otherwise. ``exact``: LAPACK. ``randomized``: Halko-Martinsson-Tropp range finder with power
  iterations, seeded through ``ctx.generator``), and the polar (orthogonal Procrustes) factor of a
  matrix, by the Gram eigendecomposition ``A (A^T A)^{-1/2}`` under the same guard (default) or by SVD
  (``P Q^T`` for ``A = P S Q^T``). Guarded results agree with LAPACK to float32 accuracy (measured, see
  docs/methods/spectral.md); the guard's pre-check (:func:`likely_well_conditioned`) is a Cholesky test.
* :class:`LowRank`: a factored matrix ``B @ A`` (TSV-C and Twin-Merging's exclusive knowledge).
* :func:`fallback_chunkable`: the methods' ``chunkable`` rule (row chunks for the element-wise fallback only).
* :func:`parallel_map`: opt-in (``PARALLEL``) concurrent per-task decompositions of one matrix, one
  single-threaded LAPACK call per worker (see docs/methods/spectral.md for why it is off by default).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import MergeError, Param

DEFAULT_EXCLUDE = r"embed;(^|\.)wte\.;(^|\.)wpe\.;(^|\.)shared\.;lm_head;text_projection"

SVD_MODES = ("gram", "exact", "randomized")  # the first is the default
ORTHO_MODES = ("eigh", "svd")  # the first is the default
OVERSAMPLE = 10  # extra columns of the randomized range finder
_SVD_HELP = {"exact": "exact (LAPACK)",
             "gram": "gram (eigh of the smaller Gram matrix where the spectrum allows it, else LAPACK; default)",
             "randomized": "randomized (range finder, fastest for small ranks)"}


# ---------------------------------------------------------------------------------------------------
# parameters shared by the spectral methods


def spectral_params(svd_modes: tuple[str, ...] = SVD_MODES, orthogonalize: bool = True) -> tuple[Param, ...]:
    """The options every spectral method takes (exclusion list and SVD back-end)."""
    ps = [
        Param("spectral_exclude", str, "default",
              help="';'-separated regexes of 2-D tensors NOT to SVD (use the fallback); 'default' = "
                   + DEFAULT_EXCLUDE.replace(";", " ; ") + "; '' = none"),
        Param("svd", str, svd_modes[0], choices=svd_modes,
              help="SVD back-end: " + ", ".join(_SVD_HELP[m] for m in svd_modes)),
        Param("svd_dtype", str, "float32", choices=("float32", "float64"), help="dtype of the decompositions"),
    ]
    if "randomized" in svd_modes:
        ps.insert(2, Param("svd_niter", int, 2, help="power iterations of svd=randomized"))
    if orthogonalize:
        ps.append(Param("orthogonalize", str, "eigh", choices=ORTHO_MODES,
                        help="polar factor by eigh (A (A^T A)^-1/2, TSVM_2 whitening, where A is within 10x of "
                             "orthogonal, else SVD; default) or svd (P Q^T of the SVD, paper)"))
    return tuple(ps)


def compute_dtype(p) -> torch.dtype:
    return torch.float64 if p.get("svd_dtype", "float32") == "float64" else torch.float32


# ---------------------------------------------------------------------------------------------------
# exclusion


@lru_cache(maxsize=64)
def exclude_patterns(spec: str | None) -> tuple[re.Pattern, ...]:
    """Compile a ``;``-separated regex list (``default`` expands to DEFAULT_EXCLUDE)."""
    if spec is None:
        spec = "default"
    out = []
    for tok in str(spec).split(";"):
        tok = tok.strip()
        if not tok:
            continue
        if tok.lower() == "default":
            out.extend(exclude_patterns(DEFAULT_EXCLUDE))
            continue
        try:
            out.append(re.compile(tok))
        except re.error as e:
            raise MergeError(f"spectral_exclude: {tok!r} is not a valid regex ({e})") from None
    return tuple(out)


def is_matrix_shape(name: str, shape, spec: str | None = "default") -> bool:
    """True when a tensor of this name and shape is SVD'd: 2-D, non-empty, name matching no exclusion regex."""
    shape = tuple(shape)
    if len(shape) != 2 or 0 in shape:
        return False
    return not any(p.search(name) for p in exclude_patterns(spec))


def is_matrix(name: str, x: torch.Tensor, spec: str | None = "default") -> bool:
    """:func:`is_matrix_shape` of a tensor."""
    return is_matrix_shape(name, x.shape, spec)


def fallback_chunkable(params, name: str, shape: tuple) -> bool:
    """``chunkable`` of the spectral methods: True exactly for the tensors that take the element-wise mean
    fallback (non-2-D or excluded), so the engine streams e.g. the vocab x hidden embeddings in row chunks."""
    return not is_matrix_shape(name, shape, params.get("spectral_exclude", "default"))


def delta_sum(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """sum_i (theta_i - theta_0), each difference taken exactly as in the task vectors (two buffers)."""
    out = models[0] - base
    tmp = torch.empty_like(out)
    for m in models[1:]:
        out.add_(torch.sub(m, base, out=tmp))
    return out


def mean_fallback(base: torch.Tensor, models: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The fallback of TSV/Iso/RESM for non-matrices (official code): theta_0 + alpha * mean_i (theta_i -
    theta_0), with two extra buffers at most (these tensors include vocab x hidden embeddings)."""
    return delta_sum(base, models).mul_(alpha / len(models)).add_(base)


# ---------------------------------------------------------------------------------------------------
# concurrency of independent decompositions

# Off by default: on the project's loaded 2-core VM, a 2048x2048 TSV-M merge with 3 models was not faster
# (3 tasks on 2 workers leave one core idle for a round; two single-threaded eigh/SVD runs compete for
# memory bandwidth). Opt in with ``PARALLEL = True`` (e.g. 2 or 4 tasks, more cores); results then do not
# depend on WORKERS (tested), but differ in rounding from the multi-threaded default.
PARALLEL = False  # False: one after another with the caller's torch threads (multi-threaded LAPACK)
WORKERS: int | None = None  # pool size; None: torch.get_num_threads() at the call


def parallel_map(fn, items, *, enabled: bool = True) -> list:
    """``[fn(x) for x in items]`` with the calls run concurrently by ``min(WORKERS or torch.get_num_threads(),
    len(items))`` threads, each call single-threaded (torch/MKL thread count 1; torch ops release the GIL).

    LAPACK's SVD/eigh gain only ~1.5x from two threads; independent single-threaded calls side by side could
    gain up to 2x (not observed on the 2-core VM, hence ``PARALLEL`` off). Every call runs single-threaded
    whatever the pool size, so results do not depend on ``WORKERS``.
    The process-wide thread count is set to 1 for the section and restored afterwards. ``enabled=False``
    (e.g. CUDA tensors) or ``PARALLEL = False`` runs the plain loop with the caller's threads.
    """
    items = list(items)
    if not (PARALLEL and enabled) or not items:
        return [fn(x) for x in items]
    old = torch.get_num_threads()
    workers = max(1, min(WORKERS or old, len(items)))

    def call(x):
        torch.set_num_threads(1)  # OpenMP/MKL thread counts are per thread: set them in the worker too
        return fn(x)

    torch.set_num_threads(1)
    try:
        if workers == 1:
            return [call(x) for x in items]
        with ThreadPoolExecutor(workers, thread_name_prefix="mergesmith-svd") as pool:
            return list(pool.map(call, items))
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# decompositions


def _lapack_svd(a: torch.Tensor):
    """``torch.linalg.svd`` (gesdd); when it fails to converge (it can on float32 matrices with large clusters
    of equal singular values), once more in float64, cast back."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        return tuple(t.to(a.dtype) for t in torch.linalg.svd(a.to(torch.float64), full_matrices=False))


def svd(x: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Thin SVD ``x = U diag(S) Vh`` in ``dtype``, computed on the tall orientation."""
    a = x.to(dtype)
    if a.shape[0] < a.shape[1]:
        U, S, Vh = _lapack_svd(a.mT)
        return Vh.mT, S, U.mT
    return _lapack_svd(a)


# Guards of the Gram/eigh routes (see docs/methods/spectral.md, "Accuracy of the fast routes"). The
# eigendecomposition of a Gram matrix squares the condition number: in float32 a singular value s_j is
# resolved to ~eps * s_1^2 / s_j, so the route is used only where the needed part of the spectrum is within
# GUARD_KAPPA of the largest singular value; otherwise the exact LAPACK decomposition runs (the fallback).
# Measured (float32): for kappa <= 10 the Gram/eigh results agree with LAPACK to the same error as LAPACK's
# own float32 result against float64 (~1e-6 relative); at kappa 100 the eigh polar factor was 30x worse.
GUARD_KAPPA = {torch.float32: 10.0, torch.float64: 1e4}


def guard_kappa(dtype: torch.dtype) -> float:
    """Largest condition number s_1 / s_j the Gram routes accept in ``dtype``."""
    return GUARD_KAPPA.get(dtype, GUARD_KAPPA[torch.float32])


def _lambda_max(G: torch.Tensor, iters: int = 12) -> float:
    """An estimate of the largest eigenvalue of a PSD matrix (power iteration, deterministic start)."""
    x = G.new_ones(G.shape[0])
    lam = 0.0
    for _ in range(iters):
        y = G @ x
        lam = float(y.norm())
        if not lam > 0:
            return 0.0
        x = y / lam
    return lam


def likely_well_conditioned(G: torch.Tensor, kappa: float) -> bool:
    """Cheap pre-check that a PSD Gram ``G`` has lambda_min >= lambda_max / kappa^2: Cholesky of
    ``G - lambda_max_est / kappa^2 I`` succeeds (1/3 n^3 flops, ~1/20 of an eigh). Used to skip a float32
    eigendecomposition that the post-check would reject; the post-check on the eigenvalues decides."""
    lam = _lambda_max(G)
    if not lam > 0 or not bool(torch.isfinite(G).all()):
        return False
    shifted = G - (lam / kappa ** 2) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return int(torch.linalg.cholesky_ex(shifted).info) == 0


def _gram_eigh(G: torch.Tensor):
    """Eigen-decomposition of a Gram matrix, eigenvalues descending (and clamped at 0)."""
    lam, Q = torch.linalg.eigh(G)
    return lam.flip(0).clamp_min(0), Q.flip(1)


def _gram_svd(a: torch.Tensor, k: int, guard: int | None = None, precheck: bool = False):
    """Leading ``k`` singular triplets of ``a`` from the eigendecomposition of its smaller Gram matrix, or
    None when the guard rejects it: s_guard < s_1 / GUARD_KAPPA, with ``guard`` (default k) the number of
    triplets that must be accurate. ``precheck``: skip the eigh when a Cholesky test already shows
    s_min < s_1 / GUARD_KAPPA (use when guard = all)."""
    # square matrices take the a a^T route, so that U (eigenvectors) is orthonormal even for a singular a
    tall = a.shape[0] > a.shape[1]
    t = a if tall else a.mT
    kappa = guard_kappa(a.dtype)
    G = t.mT @ t
    if precheck and not likely_well_conditioned(G, kappa):
        return None
    lam, Q = _gram_eigh(G)
    del G
    S = lam.sqrt()
    need = max(1, min(k if guard is None else guard, S.numel()))
    if not bool(torch.isfinite(S).all()) or not S[need - 1] * kappa >= S[0] or not S[0] > 0:
        return None
    lam, Q, S = lam[:k], Q[:, :k], S[:k]
    fi = torch.finfo(a.dtype)
    inv = torch.where(S > S[:1] * fi.eps * max(a.shape), 1.0 / S.clamp_min(fi.tiny), torch.zeros_like(S))
    Uo = (t @ Q) * inv
    return (Uo, S, Q.mT) if tall else (Q, S, Uo.mT)


def _randomized_svd(a: torch.Tensor, k: int, generator: torch.Generator | None, niter: int):
    m, n = a.shape
    tall = m >= n
    t = a if tall else a.mT  # t: M x Nn with M >= Nn; find its column space
    M, Nn = t.shape
    q = min(Nn, k + OVERSAMPLE)
    omega = torch.randn(Nn, q, generator=generator, dtype=a.dtype, device=a.device)
    Y = t @ omega
    Q, _ = torch.linalg.qr(Y)
    for _ in range(max(0, niter)):
        Z, _ = torch.linalg.qr(t.mT @ Q)
        Q, _ = torch.linalg.qr(t @ Z)
    B = Q.mT @ t  # q x Nn
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return (U, S, Vh) if tall else (Vh.mT, S, U.mT)


def top_svd(x: torch.Tensor, k: int, mode: str = "gram", *, generator: torch.Generator | None = None,
            niter: int = 2, dtype: torch.dtype = torch.float32):
    """The leading ``k`` singular triplets (U_k [m,k], S_k [k], Vh_k [k,n]) of a 2-D ``x`` in ``dtype``.

    mode ``gram`` (default): eigh of the smaller Gram matrix when s_k >= s_1 / GUARD_KAPPA (the k-th
    singular value is resolved to float32 accuracy), else LAPACK; ``exact``: LAPACK thin SVD;
    ``randomized``: range finder with ``niter`` power iterations (``generator`` seeds the test matrix).
    ``k`` is clipped to [0, min(m, n)]; ``randomized`` falls back to ``exact`` when k is more than half the rank.
    """
    a = x.to(dtype)
    r = min(a.shape)
    k = max(0, min(int(k), r))
    if k == 0:
        return a.new_zeros(a.shape[0], 0), a.new_zeros(0), a.new_zeros(0, a.shape[1])
    if mode not in SVD_MODES:
        raise MergeError(f"unknown svd mode {mode!r}; use one of {', '.join(SVD_MODES)}")
    if mode == "gram":
        out = _gram_svd(a, k, precheck=k == r)
        if out is not None:
            return out
    elif mode == "randomized" and 2 * (k + OVERSAMPLE) <= r:
        return _randomized_svd(a, k, generator, niter)
    U, S, Vh = svd(a, dtype)
    return U[:, :k], S[:k], Vh[:k]


def full_svd(x: torch.Tensor, mode: str = "gram", dtype: torch.dtype = torch.float32, accurate: int | None = None):
    """All r = min(m, n) triplets. ``gram``: the guarded Gram eigendecomposition (the leading ``accurate``
    triplets, default all, must pass the guard; the others then still form an orthonormal completion of
    the basis), LAPACK when it is rejected; anything else: LAPACK."""
    a = x.to(dtype)
    r = min(a.shape)
    if mode == "gram" and r > 0:
        guard = r if accurate is None else accurate
        out = _gram_svd(a, r, guard=guard, precheck=guard >= r)
        if out is not None:
            return out
    return svd(a, dtype)


def _polar_eigh(a: torch.Tensor) -> torch.Tensor | None:
    """``a (a^T a)^{-1/2}`` for a tall ``a`` (the official "TSVM_2" whitening), or None when a is not
    within GUARD_KAPPA of orthogonal (sigma_min < sigma_max / kappa), where the squared condition number of
    the Gram would cost accuracy (a Cholesky pre-check skips the eigh for clearly ill-conditioned a)."""
    kappa = guard_kappa(a.dtype)
    G = a.mT @ a
    if not likely_well_conditioned(G, kappa):
        return None
    lam, Q = torch.linalg.eigh(G)
    del G
    if not bool(torch.isfinite(lam).all()) or not lam[0] * kappa ** 2 >= lam[-1] or not lam[0] > 0:
        return None
    return a @ ((Q * lam.rsqrt()) @ Q.mT)


def polar(a: torch.Tensor, method: str = "eigh") -> torch.Tensor:
    """Orthogonal polar factor of ``a`` (m x p): the matrix with orthonormal columns (rows if p > m)
    closest to ``a`` in Frobenius norm (orthogonal Procrustes).

    ``svd``: ``P Q^T`` for ``a = P S Q^T`` (paper). ``eigh`` (default): ``a (a^T a)^{-1/2}`` from the
    eigendecomposition of the small Gram matrix when sigma_min(a) >= sigma_max(a) / GUARD_KAPPA (the two
    are then equal to float32 accuracy, measured), else the SVD route (e.g. the nearly square, ill-
    conditioned concatenations of TSV-M with N * k ~ r, or rank-deficient ``a``, which the SVD completes).
    """
    if a.numel() == 0:
        return a.clone()
    if method not in ORTHO_MODES:
        raise MergeError(f"unknown orthogonalize mode {method!r}; use svd or eigh")
    if method == "eigh":
        wide = a.shape[1] > a.shape[0]
        out = _polar_eigh(a.mT if wide else a)
        if out is not None:
            return out.mT if wide else out
    U, _, Vh = svd(a, a.dtype)
    return U @ Vh


def orthogonal_merge(Us: list[torch.Tensor], Ss: list[torch.Tensor], Vhs: list[torch.Tensor],
                     method: str = "eigh", isotropic: bool = False, consume: bool = False,
                     u_orthonormal_head: bool = False) -> torch.Tensor:
    """TSV-M / Iso-CTS core: concatenate the blocks, orthogonalise U and V by their polar factors and
    rebuild ``U_perp diag(S) V_perp^T`` (``isotropic``: every singular value set to the mean of S).
    ``consume``: empty the lists ``Us``/``Vhs`` once concatenated (frees the blocks if the caller holds no
    other reference; lowers the memory peak). ``u_orthonormal_head``: ``Us[0]`` has orthonormal columns
    orthogonal to all other blocks (Iso-CTS's common subspace); then (U^T U)^{-1/2} is block diagonal and
    polar([U_0 | W]) = [U_0 | polar(W)] exactly, so only the small task block W is orthogonalised."""
    head = Us[0].shape[1] if u_orthonormal_head and Us else 0
    U = torch.cat(Us, dim=1)
    S = torch.cat(Ss)
    V = torch.cat([vh.mT for vh in Vhs], dim=1)
    if consume:
        Us.clear(), Vhs.clear()
    if S.numel() == 0:
        return U.new_zeros(U.shape[0], V.shape[0])
    if isotropic:
        S = torch.full_like(S, S.mean())
    Up, Vp = parallel_map(lambda a: polar(a, method), [U[:, head:], V], enabled=U.device.type == "cpu")
    if head:
        Up = torch.cat([U[:, :head], Up], dim=1)
    del U, V
    return Up.mul_(S) @ Vp.mT  # polar returns fresh tensors: scale in place


# ---------------------------------------------------------------------------------------------------
# factored matrices


@dataclass
class LowRank:
    """A matrix stored as ``B @ A`` (B: m x k, A: k x n). ``dense()`` rebuilds it (float32)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def numel(self) -> int:
        return self.B.numel() + self.A.numel()

    def dense(self) -> torch.Tensor:
        if self.rank == 0:
            return self.B.new_zeros(self.shape, dtype=torch.float32)
        return (self.B.to(torch.float32) @ self.A.to(torch.float32))

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.B.to(*args, **kwargs), self.A.to(*args, **kwargs))


def low_rank(x: torch.Tensor, k: int, mode: str = "exact", *, generator=None, niter: int = 2,
             dtype: torch.dtype = torch.float32) -> LowRank:
    """Best rank-``k`` approximation of ``x`` (Eckart-Young) as ``LowRank(U_k S_k, Vh_k)`` in float32."""
    U, S, Vh = top_svd(x, k, mode, generator=generator, niter=niter, dtype=dtype)
    return LowRank((U * S).to(torch.float32), Vh.to(torch.float32))
