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

# Names of 2-D tensors that are embeddings (lookup tables), not linear maps: element-wise in OPCM.
EMBEDDING_PATTERN = re.compile(
    r"(^|[._])(embed\w*|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings|"
    r"shared|embeddings)([._]|$)"
)

ZERO_NORM = 1e-30  # ||Delta||^2 at or below this: treat the layer as unchanged (no projection)


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


def project(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True) -> torch.Tensor:
    """tau~: the new task matrix ``tau`` with its components in the dominant singular block of ``delta``
    (and, by default, along every singular pair u_j v_j^T of ``delta``) removed.

    Equals ``U P V^T`` with P = U^T tau V, P[j,j] = 0 (all j, if zero_full_diagonal), P[:rho,:rho] = 0,
    computed with thin bases only.  ``delta`` may be any positive multiple of the merged update."""
    if float(torch.linalg.vector_norm(delta)) ** 2 <= ZERO_NORM:
        return tau
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


def step(name: str, d_prev: torch.Tensor, tau: torch.Tensor, alpha: float, zero_full_diagonal: bool = True) -> torch.Tensor:
    """One OPCM step on one tensor: D^(t) = D^(t-1) + tau~_t (tau~ = tau for element-wise tensors)."""
    if is_projected(name, tau.shape):
        t = project(d_prev, tau, alpha, zero_full_diagonal)
        if t is not tau:  # a fresh tensor: add in place (saves one copy of the matrix)
            return t.add_(d_prev)
    return d_prev + tau


def chain(name: str, taus: Sequence[torch.Tensor], alpha: float, zero_full_diagonal: bool = True) -> torch.Tensor:
    """D^(N) for one tensor given the task vectors in arrival order (D^(1) = tau_1)."""
    d = taus[0].clone()
    for tau in taus[1:]:
        d = step(name, d, tau, alpha, zero_full_diagonal)
    return d


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
        d = step(ctx.name, state.to(dev), tau, p["alpha"], p["zero_full_diagonal"])
        self._acc(acc, tau, d)
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
