"""OPCM: Orthogonal Projection-based Continual Merging - the math, shared by ``mergesmith continual``
and the ``opcm`` merge method (one implementation).

Tang, Yang, Shen, Luo, Hu, Du, Tao, "Merging Models on the Fly Without Retraining: A Sequential Approach
to Scalable Continual Model Merging", arXiv 2501.09522 (NeurIPS 2025); official code tanganke/opcm and
FusionBench ``fusion_bench/method/opcm/opcm.py``.

Official update for model t >= 2 (tau_t = theta_t - theta_0, Delta = theta^(t-1) - theta_0, per Linear
weight; || . || is the L2 norm over the whole model):

    Delta = U diag(s) V^T                                    (SVD)
    rho   = first j with cumsum(s)_j / sum(s) > alpha        (0-based "split rank")
    P     = U^T tau_t V ;  P[j, j] = 0 for all j ;  P[:rho, :rho] = 0
    tau~  = U P V^T                                          (other tensors: tau~ = tau_t)
    theta' - theta_0 = lambda_{t-1} Delta + tau~
    a_t   = mean_i ||tau_i|| ;  lambda_t = ||theta' - theta_0|| / a_t
    theta^(t) = theta_0 + (theta' - theta_0) / lambda_t

Exact reformulation used here.  Let D^(t) = lambda_t (theta^(t) - theta_0), the *unscaled* running sum.
Then D^(1) = tau_1 and D^(t) = D^(t-1) + tau~_t: the projection only needs the singular vectors of
Delta, which are those of D^(t-1) (a positive multiple), and alpha compares ratios of singular values,
which scaling does not change.  So the per-tensor chain depends on that tensor alone, and the whole-model
coupling is one scalar applied at the end:

    theta^(t) = theta_0 + D^(t) * a_t / ||D^(t)||            (= theta_1 exactly when t = 1)

The continual state stores D and the norms; the ``opcm`` method gathers ||tau_i|| and ||D^(N)|| in a
statistics pass.  The zeroed components all lie in the span of the thin singular vectors (diagonal
indices and the rho x rho block are < rank), so we never form the full m x m / n x n bases:
tau~ = tau - U_r (M o (U_r^T tau V_r)) V_r^T with M the mask of zeroed entries.

Gram route (tall matrices, m >= GRAM_ASPECT * n; wide ones transposed).  Everything the projection needs
is n x n: with D^T D = V S^2 V^T (eigh, float64) the thin left factor is U = D V S^-1, so

    P = U^T tau V = S^-1 V^T (D^T tau) V,   U (M o P) V^T = D K,   K = V S^-1 (M o P) V^T,

and tau~ = tau - D K is formed in row blocks (D^T D and D^T tau are accumulated in float64 over row
blocks).  No m x n factor and no LAPACK workspace: for lm_head (32000 x 2048) ~350 MB less memory and a
little less time than the thin SVD.  The Gram squares the condition number, so the route is taken only
when s_min > GRAM_RCOND * s_max (1e-6); in float64 it is then more accurate than the float32 thin SVD
(measured: 1e-8..1e-4 vs 1e-6..3e-2 relative to a float64 SVD reference, depending on s_max / s_min).
Otherwise (e.g. low-rank/LoRA deltas, whose null directions are rounding noise) the exact thin SVD runs.
Near-square matrices keep the thin SVD: there the float64 Gram route costs more CPU than LAPACK's float32
SVD (measured), with no memory to save -- unless D is well conditioned (s_max / s_min <= GRAM32_KAPPA = 10,
e.g. full-rank fine-tune deltas of a 5632 x 2048 matrix): then the whole Gram route runs in float32
(:func:`project_gram32`, any shape; a Cholesky test decides before the eigh), which is as accurate as the
float32 thin SVD there (measured) at about half its CPU time.

Coefficient route (the one-shot method's row-chunked tall matrices, e.g. a vocab x hidden lm_head): the
whole chain needs only the pairwise Grams G_ij = tau_i^T tau_j (n x n, float64), accumulated over row
chunks.  With X_j = D^T tau_j, A_t = I - K_t:

    D^(1) = tau_1, D^T D = G_11, X_j = G_1j
    step t:  K_t from (D^T D, X_t) as above;  D^(t) = D^(t-1) A_t + tau_t
             D^T D <- A^T (D^T D) A + A^T X_t + X_t^T A + G_tt;   X_j <- A^T X_j + G_tj  (j > t)
    D^(N) = sum_i tau_i C_i  (C_i = A_{i+1} ... A_N, C_N = I);   ||D^(N)||^2 = trace(D^T D)

so the apply pass forms D^(N) chunk by chunk.  Memory: N(N+1)/2 Grams of n x n (float64), less than the
N + 1 whole float32 inputs when N < m / n.  There the full matrix is never held, so no exact fallback
exists: directions with s_j <= GRAM_RCOND * s_max are left unprojected (their singular vectors are
rounding noise in a float32 SVD as well); documented in docs/continual.md.

Deviations, all documented in ``docs/continual.md``:

* ``zero_full_diagonal=True`` (default) is FusionBench's fix (commit 2c3df13, ``.diagonal().fill_(0)``);
  ``False`` reproduces the paper release, where ``.diag().fill_(0)`` was a no-op on a copy, so only the
  rho x rho block (with its own diagonal) is removed.
* If no cumulative ratio exceeds alpha (alpha >= 1) we protect every direction (rho = rank); the
  official ``argmax`` of an all-false vector gives rho = 0 there.
* A tensor whose merged update is zero (||Delta|| = 0, a frozen layer) is not projected (the official
  code would remove arbitrary components of an arbitrary basis).
* "Linear weights" are recognised from the state dict: every 2-D tensor except embeddings (names with
  ``embed``, ``wte``, ``wpe``, ``shared``, ...).  GPT-2's ``Conv1D`` weights are linear maps stored
  transposed and are projected too (the official code, written for CLIP, only projects ``nn.Linear``).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from ..methods.kernels import row_ranges

# Names of 2-D tensors that are embeddings (lookup tables), not linear maps: element-wise in OPCM.
EMBEDDING_PATTERN = re.compile(
    r"(^|[._])(embed\w*|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings|"
    r"shared|embeddings)([._]|$)"
)

ZERO_NORM = 1e-30  # ||Delta||^2 at or below this: treat the layer as unchanged (no projection)
GRAM_RCOND = 1e-6  # Gram route only when s_min > GRAM_RCOND * s_max (float64 eigh of D^T D)
GRAM_ASPECT = 4.0  # Gram route for matrices with max(m, n) >= GRAM_ASPECT * min(m, n); thin SVD otherwise
GRAM32_KAPPA = 10.0  # float32 Gram route (any shape) when s_max / s_min <= GRAM32_KAPPA
BLOCK_ELEMENTS = 1 << 22  # rows per block of the Gram route: ~this many elements (float64 temporaries)
CHUNK_MIN_ELEMENTS = 1 << 24  # one-shot: tall matrices this large (and >= GRAM_ASPECT) stream in row chunks


def is_projected(name: str, shape: Sequence[int]) -> bool:
    """True for tensors OPCM treats as linear-layer weights (projected); False for element-wise ones."""
    return len(shape) == 2 and min(shape) >= 1 and not EMBEDDING_PATTERN.search(name)


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """rho = first (0-based) j with cumsum(s)[j] / sum(s) > alpha; len(s) if there is none.

    ``s`` are singular values (descending).  alpha is a fraction of the *sum* of singular values, not of
    their squares (official code)."""
    total = float(s.sum())
    if not total > 0:
        return 0
    above = (torch.cumsum(s.to(torch.float64), 0) / total) > alpha
    idx = torch.nonzero(above)
    return int(idx[0]) if idx.numel() else int(s.numel())


def thin_svd(x: torch.Tensor):
    """Thin SVD x = U diag(s) Vh, computed on the tall orientation (LAPACK's gesdd is 2-4x slower on wide
    matrices than on their transpose)."""
    if x.shape[0] < x.shape[1]:
        U, s, Vh = torch.linalg.svd(x.mT, full_matrices=False)
        return Vh.mT, s, U.mT
    return torch.linalg.svd(x, full_matrices=False)


def _row_blocks(m: int, n: int) -> list[tuple[int, int]]:
    return row_ranges(m, n, BLOCK_ELEMENTS)


def gram_spectrum(G: torch.Tensor, cutoff: bool = False, rcond: float | None = None):
    """(s, V): singular values (descending) and right singular vectors of D from its Gram
    G = D^T D = V diag(s^2) V^T.  None when the guard rejects it (s_min <= rcond * s_max, default GRAM_RCOND,
    or non-finite); with ``cutoff`` the directions with s_j <= rcond * s_max are dropped instead
    (coefficient route)."""
    rcond = GRAM_RCOND if rcond is None else rcond
    lam, V = torch.linalg.eigh(G)
    lam, V = lam.flip(0), V.flip(1)
    s = lam.clamp_min(0).sqrt()
    if not bool(torch.isfinite(s).all()) or not s[0] > 0:
        return None
    keep = s > rcond * s[0]
    if bool(keep.all()):
        return s, V
    if not cutoff:
        return None
    k = int(keep.sum())
    return s[:k], V[:, :k]


def removal_kernel(s: torch.Tensor, V: torch.Tensor, H: torch.Tensor, alpha: float,
                   zero_full_diagonal: bool = True) -> torch.Tensor | None:
    """K (n x n, float64) with tau~ = tau - D K, from D^T D = V diag(s^2) V^T (s descending, > 0; V may have
    fewer columns than rows) and H = D^T tau:

        P = S^-1 V^T H V  (= U^T tau V),   K = V S^-1 (M o P) V^T,

    M selecting P[:rho, :rho] and (zero_full_diagonal) every P[j, j].  None when nothing is removed."""
    n = V.shape[0]
    rho = split_rank(s, alpha)
    r = s.numel() if zero_full_diagonal else rho
    if r == 0:
        return None
    W = V[:, :r] / s[:r]  # V S^-1
    WH = W.mT @ H  # rows u_j^T tau (times V^T on the right gives P)
    K = torch.zeros(n, n, dtype=H.dtype, device=H.device)
    if rho > 0:
        K.addmm_(W[:, :rho] @ (WH[:rho] @ V[:, :rho]), V[:, :rho].mT)
    if r > rho:
        diag = (WH[rho:] * V[:, rho:r].mT).sum(dim=1)  # P[j, j] = u_j^T tau v_j
        K.addmm_(W[:, rho:] * diag, V[:, rho:r].mT)
    return K


def uses_gram(shape: Sequence[int]) -> bool:
    """True for the (tall or wide) matrices projected by the Gram route (max/min >= GRAM_ASPECT)."""
    m, n = shape
    return min(m, n) >= 1 and max(m, n) >= GRAM_ASPECT * min(m, n)


def project_gram(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True,
                 inplace: bool = False) -> torch.Tensor | None:
    """:func:`project` by the Gram route (module docstring): tau - D K in row blocks, all n x n work in
    float64. None when the guard rejects D (then use the thin SVD). ``inplace``: overwrite ``tau``."""
    tall = delta.shape[0] >= delta.shape[1]
    D, T = (delta, tau) if tall else (delta.mT, tau.mT)
    m, n = D.shape
    G = torch.zeros(n, n, dtype=torch.float64, device=D.device)
    H = torch.zeros_like(G)
    blocks = _row_blocks(m, n)
    for a, b in blocks:
        d = D[a:b].to(torch.float64)
        G.addmm_(d.mT, d)
        H.addmm_(d.mT, T[a:b].to(torch.float64))
    del d
    spec = gram_spectrum(G)
    del G
    if spec is None:
        return None
    K = removal_kernel(*spec, H, alpha, zero_full_diagonal)
    del H
    if K is None:
        return tau
    out = T if inplace else T.clone()
    for a, b in blocks:
        out[a:b].sub_((D[a:b].to(torch.float64) @ K).to(out.dtype))
    return out if tall else out.mT


def project_gram32(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True,
                   inplace: bool = False) -> torch.Tensor | None:
    """:func:`project` by the Gram route in float32, for a well-conditioned float32 ``delta``
    (s_min >= s_max / GRAM32_KAPPA, checked first by a Cholesky test, then on the eigenvalues): the float32
    Gram resolves every singular triplet to float32 accuracy there (same guard as the spectral methods'
    ``svd: gram``). About half the CPU of the thin SVD for tall matrices. None when rejected."""
    from ..methods._spectral import likely_well_conditioned

    tall = delta.shape[0] >= delta.shape[1]
    D, T = (delta, tau) if tall else (delta.mT, tau.mT)
    G = D.mT @ D
    if not likely_well_conditioned(G, GRAM32_KAPPA):
        return None
    spec = gram_spectrum(G, rcond=1.0 / GRAM32_KAPPA)
    del G
    if spec is None:
        return None
    K = removal_kernel(*spec, D.mT @ T, alpha, zero_full_diagonal)
    if K is None:
        return tau
    out = T if inplace else T.clone()
    for a, b in _row_blocks(*D.shape):
        out[a:b].sub_(D[a:b] @ K)
    return out if tall else out.mT


def project(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True,
            inplace: bool = False) -> torch.Tensor:
    """tau~: the new task matrix ``tau`` with its components in the dominant singular block of ``delta``
    (and, by default, along every singular pair u_j v_j^T of ``delta``) removed.

    Equals ``U P V^T`` with P = U^T tau V, P[j,j] = 0 (all j, if zero_full_diagonal), P[:rho,:rho] = 0,
    computed with thin bases only (tall/wide matrices: the guarded Gram route, see the module docstring).
    ``delta`` may be any positive multiple of the merged update. ``inplace``: ``tau`` may be overwritten
    (the result may then be ``tau`` itself)."""
    if float(torch.linalg.vector_norm(delta)) ** 2 <= ZERO_NORM:
        return tau
    if delta.dtype == torch.float32 and min(delta.shape) > 1:
        out = project_gram32(delta, tau, alpha, zero_full_diagonal, inplace=inplace)
        if out is not None:
            return out
    if uses_gram(delta.shape):
        out = project_gram(delta, tau, alpha, zero_full_diagonal, inplace=inplace)
        if out is not None:
            return out
    return project_svd(delta, tau, alpha, zero_full_diagonal)


def project_svd(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True) -> torch.Tensor:
    """:func:`project` by the thin SVD of ``delta`` (any shape and rank; a fresh tensor)."""
    U, s, Vh = thin_svd(delta)
    if not bool(torch.isfinite(s).all()):
        raise FloatingPointError("OPCM: the merged update has non-finite values")
    rho = split_rank(s, alpha)
    r = s.numel() if zero_full_diagonal else rho
    if r == 0:
        return tau
    A = U[:, :r].mT @ tau  # rows are u_j^T tau
    # removed = U_r C V_r^T with C = P[:rho, :rho] (+ diag(P[j, j]) for j >= rho): form U_r C, one product
    UC = torch.empty_like(U[:, :r])
    if rho > 0:
        torch.matmul(U[:, :rho], A[:rho] @ Vh[:rho].mT, out=UC[:, :rho])
    if r > rho:
        diag = (A[rho:] * Vh[rho:r]).sum(dim=1)  # P[j, j] = u_j^T tau v_j
        torch.mul(U[:, rho:r], diag, out=UC[:, rho:])
    del A, U
    return torch.addmm(tau, UC, Vh[:r], alpha=-1)


def step(name: str, d_prev: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True,
         inplace: bool = False) -> torch.Tensor:
    """One OPCM step on one tensor: D^(t) = D^(t-1) + tau~_t (tau~ = tau for element-wise tensors).
    ``inplace``: ``d_prev`` and ``tau`` belong to the caller and may be overwritten (returns ``d_prev``)."""
    if is_projected(name, tau.shape):
        t = project(d_prev, tau, alpha, zero_full_diagonal, inplace=inplace)
        if inplace:
            return d_prev.add_(t)
        if t is not tau:  # a fresh tensor: add in place (saves one copy of the matrix)
            return t.add_(d_prev)
    return d_prev.add_(tau) if inplace else d_prev + tau


def chain(name: str, taus: Sequence[torch.Tensor], alpha: float, zero_full_diagonal: bool = True,
          inplace: bool = False) -> torch.Tensor:
    """D^(N) for one tensor given the task vectors in arrival order (D^(1) = tau_1). ``inplace``: the
    task vectors are the caller's own copies; they are overwritten and ``taus[0]`` becomes D^(N)."""
    d = taus[0] if inplace else taus[0].clone()
    for tau in taus[1:]:
        d = step(name, d, tau, alpha, zero_full_diagonal, inplace=True)
    return d


# -- coefficient route: the chain from pairwise Grams (row-chunked tall matrices) ----------------------


def pairwise_grams(taus: Sequence[torch.Tensor], grams: dict | None = None) -> dict:
    """Add tau_i^T tau_j (i <= j, float64) of row chunks ``taus`` to ``grams`` ({(i, j): n x n})."""
    grams = {} if grams is None else grams
    xs = [t.to(torch.float64) for t in taus]
    for i, xi in enumerate(xs):
        for j in range(i, len(xs)):
            g = xi.mT @ xs[j]
            if (i, j) in grams:
                grams[i, j].add_(g)
            else:
                grams[i, j] = g
    return grams


def coefficient_chain(grams: dict, n_models: int, alpha: float, zero_full_diagonal: bool = True):
    """(C, ||D^(N)||^2) with D^(N) = sum_i tau_i C[i] (float64 n x n; C[N-1] is None, meaning I), from the
    pairwise Grams (consumed). The recurrences are in the module docstring; a step whose D is zero removes
    nothing (as :func:`project`), and directions with s_j <= GRAM_RCOND * s_max are not projected."""
    g = grams
    GD = g.pop((0, 0))
    X = {j: g.pop((0, j)) for j in range(1, n_models)}
    C: list = [None]
    for t in range(1, n_models):
        H = X.pop(t)
        K = None
        if float(GD.diagonal().sum()) > ZERO_NORM:
            spec = gram_spectrum(GD, cutoff=True)
            if spec is not None:
                K = removal_kernel(*spec, H, alpha, zero_full_diagonal)
        Gtt = g.pop((t, t))
        if K is None:  # A = I
            GD = GD + H + H.mT + Gtt
            for j in X:
                X[j].add_(g.pop((t, j)))
        else:
            A = torch.eye(K.shape[0], dtype=K.dtype, device=K.device).sub_(K)
            AtH = A.mT @ H
            GD = A.mT @ GD @ A + AtH + AtH.mT + Gtt
            for j in X:
                X[j] = (A.mT @ X[j]).add_(g.pop((t, j)))
            C = [A if c is None else c @ A for c in C]
        GD = (GD + GD.mT) / 2  # keep it exactly symmetric
        C.append(None)
    return C, float(GD.diagonal().sum())


def combine(taus: Sequence[torch.Tensor], C: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """sum_i tau_i C[i] (None = identity) for row chunks ``taus``, computed in float64, returned in the
    dtype of the task vectors."""
    out = None
    for t, c in zip(taus, C):
        part = t.to(torch.float64) if c is None else t.to(torch.float64) @ c
        out = part if out is None else out.add_(part)
    return out.to(taus[0].dtype)


def scale(task_norms: Sequence[float], merged_norm: float) -> float:
    """The whole-model factor a_t / ||D^(t)|| with a_t = mean_i ||tau_i|| (1 for one model or D = 0).

    The official lambda_t is its inverse: lambda_t = ||D^(t)|| / a_t (grows roughly like sqrt(t))."""
    if len(task_norms) <= 1 or not merged_norm > 0:
        return 1.0
    return float(sum(task_norms) / len(task_norms)) / merged_norm


def permutation(n: int, seed: int) -> list[int]:
    """A deterministic arrival order for ``n`` models from ``seed`` (the official ``shuffle_order``);
    the same for every tensor, so it is seeded by the global seed only."""
    from ..methods.base import seed_for

    g = torch.Generator()
    g.manual_seed(seed_for(seed, "opcm-order", n))
    return torch.randperm(n, generator=g).tolist()


def sq_norm(x: torch.Tensor) -> float:
    """||x||^2 accumulated in float64 over 4M-element pieces (whole-model norms; no big temporaries)."""
    return sum(float(c.to(torch.float64).square().sum()) for c in x.reshape(-1).split(1 << 22))


def norm(sq: float) -> float:
    return math.sqrt(max(sq, 0.0))


# -- the continual method (state: D, scalars: the task-vector norms and ||D||) -------------------------

from ..methods.base import Param  # noqa: E402
from .protocol import ContinualMethod  # noqa: E402


class OPCMContinual(ContinualMethod):
    """OPCM folded in one model at a time.  State tensor: D^(t) (float32); manifest scalars:
    ``task_norms`` (||tau_i|| for every model so far) and ``merged_norm`` (||D^(t)||).  One streaming pass
    per model: the norms of tau_t and of the new D are summed while the new D is written, so the global
    rescaling needs no extra pass (it is applied at export)."""

    name = "opcm"
    paper = "Tang et al., arXiv 2501.09522 (NeurIPS 2025)"
    math = "D = tau_1; D += proj_D(tau_t); theta = theta_0 + D * mean_i ||tau_i|| / ||D||"
    base = "required"
    order_dependent = True
    params = (
        Param("alpha", float, 0.5, help="fraction of the sum of singular values whose block is protected"),
        Param("zero_full_diagonal", bool, True, help="also drop every P[j,j] (FusionBench fix)"),
    )

    def chunkable(self, name, shape):
        return not is_projected(name, shape)

    def validate(self, p):
        from ..methods.base import MergeError

        if not 0.0 <= p["alpha"]:
            raise MergeError(f"opcm: alpha must be >= 0, got {p['alpha']}")

    def _acc(self, acc, tau, d):
        acc["tau_sq"] = acc.get("tau_sq", 0.0) + sq_norm(tau)
        acc["d_sq"] = acc.get("d_sq", 0.0) + sq_norm(d)

    def first(self, ctx, x, p, acc):
        self._acc(acc, x, x)
        return x

    def step(self, ctx, state, x, p, count, acc):
        dev = ctx.device
        tau = x.to(dev)
        acc["tau_sq"] = acc.get("tau_sq", 0.0) + sq_norm(tau)  # before the step overwrites tau
        # state and x are fresh float32 tensors made for this call (ContinualMerger.add's ``load``): in place
        d = step(ctx.name, state.to(dev), tau, p["alpha"], p["zero_full_diagonal"], inplace=True)
        acc["d_sq"] = acc.get("d_sq", 0.0) + sq_norm(d)
        return d.cpu()

    def finish(self, scalars, acc, count):
        out = dict(scalars)
        out["task_norms"] = list(scalars.get("task_norms", [])) + [norm(acc.get("tau_sq", 0.0))]
        out["merged_norm"] = norm(acc.get("d_sq", 0.0))
        return out

    def export(self, ctx, state, base, p, scalars, count):
        return base + state * scale(scalars["task_norms"], scalars["merged_norm"])

    def summary(self, scalars, count):
        norms = scalars.get("task_norms", [])
        if not norms:
            return {}
        mean = sum(norms) / len(norms)
        lam = scalars["merged_norm"] / mean if mean > 0 else float("nan")
        return {"lambda_t": lam, "sqrt_t": math.sqrt(count), "mean_task_norm": mean, "last_task_norm": norms[-1]}
