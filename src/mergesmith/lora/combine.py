"""Merge LoRA adapters module by module (adapter space).

Follows PEFT's ``LoraModel.add_weighted_adapter`` (huggingface/peft, ``tuners/lora/model.py`` and
``utils/merge_utils.py``) with the scaling ``s_i`` of every adapter folded in exactly once, and writes the
result with scaling 1. Notation: adapter i has factors ``A_i`` (r_i x in), ``B_i`` (out x r_i), scaling
``s_i``, user weight ``w_i``, ``c_i = w_i s_i``, ``ΔW_i = s_i B_i A_i``.

Exact or dense methods (merge the deltas):

* ``cat``: A' = [c_1 A_1; ...; c_N A_N], B' = [B_1 ... B_N]; rank Σ r_i; B'A' = Σ c_i B_i A_i exactly.
* ``svd``: ΔW = Σ w_i ΔW_i, then the truncated SVD B' = U_k S_k, A' = V_k^T (k = ``rank``, default the
  largest input rank of the module). At full rank this is exact. Computed from the stacked factors
  (two QRs and an SVD of a Σr_i x Σr_i core), never forming ΔW.
* ``ties`` / ``dare_ties`` / ``dare_linear`` / ``magnitude_prune``: the operator on the dense ΔW_i, then the
  same SVD. These are PEFT's ``ties_svd`` / ``dare_ties_svd`` / ``dare_linear_svd`` /
  ``magnitude_prune_svd`` (accepted as aliases). Operators, as in PEFT's merge_utils:
  magnitude prune keeps the top ``density`` fraction of |x| per tensor; DARE keeps each entry with
  probability ``density`` and divides by it; TIES elects sign(Σ pruned x_i) (``majority_sign=total``) or
  sign(Σ sign x_i) (``frequency``), ties going to +1, on the *unweighted* pruned deltas, then averages
  the weighted entries whose unweighted sign agrees, dividing by their count.
  ``svd_method=randomized`` replaces their full SVD with a randomized one (faster for large matrices,
  approximate).

Factor-wise methods (PEFT's non-SVD types; B'A' has cross terms B_i A_j and is not Σ c_i ΔW_i):

* ``linear``: A' = Σ sign(c_i) sqrt|c_i| A_i, B' = Σ sqrt|c_i| B_i.
* ``factorwise_ties`` / ``factorwise_dare_ties`` / ``factorwise_dare_linear`` /
  ``factorwise_magnitude_prune``: the operator applied separately to the A_i (weights sign(c_i)sqrt|c_i|)
  and to the B_i (weights sqrt|c_i|). These are PEFT's ``ties`` / ``dare_ties`` / ``dare_linear`` /
  ``magnitude_prune``; we rename them because they are not TIES/DARE on the deltas.
  PEFT requires equal ranks; we zero-pad smaller ranks (identical results when ranks are equal).

* ``lego``: LoRA-LEGO rank-wise clustering, see :mod:`.lego`.

Modules present in only some adapters are merged with zeros for the others (PEFT skips them, which gives
the same result). ``lora_bias`` terms are always combined linearly: b' = Σ c_i b_i.
Random pruning draws from a generator seeded by (seed, module name, adapter index).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..methods import kernels as K
from ..methods.base import MergeError, TensorContext
from .adapter import Factors

DENSE = ("svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")
FACTORWISE = ("linear", "factorwise_ties", "factorwise_dare_ties", "factorwise_dare_linear", "factorwise_magnitude_prune")
METHODS = ("cat",) + DENSE + FACTORWISE + ("lego",)
ALIASES = {
    "ties_svd": "ties", "dare_ties_svd": "dare_ties", "dare_linear_svd": "dare_linear",
    "magnitude_prune_svd": "magnitude_prune", "concat": "cat", "lora_lego": "lego",
}
_NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


def canonical_method(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        import difflib

        close = difflib.get_close_matches(key, list(METHODS) + list(ALIASES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise MergeError(f"unknown LoRA merge method '{name}' (one of {', '.join(METHODS)}).{hint}")
    return key


@dataclass
class CombineOptions:
    """What to merge and how. ``rank``: output rank for svd-family and lego (default: the largest input
    rank of each module). ``density``: kept fraction for ties/dare/magnitude_prune (required)."""

    method: str = "svd"
    weights: list = field(default_factory=list)
    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"  # total | frequency
    svd_clamp: float | None = None  # PEFT's svd_clamp quantile in (0, 1]
    seed: int = 0
    lego_iters: int = 10
    lego_norm: str = "linf"  # linf | l2 | none: parameter reweighting
    lego_output_reweight: bool = True
    svd_method: str = "exact"  # exact | randomized (dense ties/dare/magnitude_prune deltas only)

    def __post_init__(self):
        self.method = canonical_method(self.method)
        if self.majority_sign not in ("total", "frequency"):
            raise MergeError(f"majority_sign must be 'total' or 'frequency', got {self.majority_sign!r}")
        base = self.method.removeprefix("factorwise_")
        if base in _NEEDS_DENSITY:
            if self.density is None:
                raise MergeError(f"LoRA merge method '{self.method}' needs a density (fraction of entries kept, e.g. 0.5)")
            if not 0.0 <= float(self.density) <= 1.0:
                raise MergeError(f"density must be in [0, 1], got {self.density}")
        if self.rank is not None and int(self.rank) < 1:
            raise MergeError(f"rank must be >= 1, got {self.rank}")
        if self.svd_clamp is not None and not 0.0 < float(self.svd_clamp) <= 1.0:
            raise MergeError(f"svd_clamp is a quantile in (0, 1], got {self.svd_clamp}")
        if self.lego_norm not in ("linf", "l2", "none"):
            raise MergeError(f"lego_norm must be linf, l2 or none, got {self.lego_norm!r}")
        if self.svd_method not in ("exact", "randomized"):
            raise MergeError(f"svd_method must be exact or randomized, got {self.svd_method!r}")
        if self.lego_iters < 1:
            raise MergeError("lego_iters must be >= 1")

    @property
    def is_dense(self) -> bool:
        return self.method in DENSE


def combine(opts: CombineOptions, x: torch.Tensor, w: torch.Tensor, ctx: TensorContext, idx: list[int]) -> torch.Tensor:
    """PEFT's merge operators on stacked tensors x [N, ...] with weights w [N] (model indices ``idx``)."""
    base = opts.method.removeprefix("factorwise_")
    if base in ("svd", "linear"):
        return _weighted_sum(x, w)
    if base in ("magnitude_prune", "ties"):
        x = torch.stack([xi * K.topk_mask(xi, opts.density) for xi in x])
    elif base in ("dare_linear", "dare_ties"):
        x = torch.stack([
            K.rescale(xi, xi * K.bernoulli_mask(xi.shape, opts.density, ctx.generator(i)), "inverse_keep_prob", opts.density)
            for xi, i in zip(x, idx)
        ])
    if base in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(x, w)
    rule = "mass" if opts.majority_sign == "total" else "count"
    xs = list(x)
    sign = K.fill_zeros(K.elect_sign_list(xs, rule), 1.0)  # ties go to +1
    return K.disjoint_merge_list([xi * wi for xi, wi in zip(xs, w)], sign, agg="mean", votes=xs)


def _weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w.reshape((-1,) + (1,) * (x.dim() - 1))).sum(dim=0)


def _present(inputs: list[Factors | None]) -> list[int]:
    idx = [i for i, f in enumerate(inputs) if f is not None]
    if not idx:
        raise ValueError("no adapter has this module")
    return idx


def merged_bias(inputs: list[Factors | None], weights) -> torch.Tensor | None:
    """b' = Σ w_i s_i b_i over adapters with a lora_B bias; None when none has one."""
    out = None
    for f, w in zip(inputs, weights):
        if f is not None and f.bias is not None:
            term = f.bias * (w * f.scale)
            out = term if out is None else out + term
    return out


def dense_delta(opts: CombineOptions, name: str, inputs: list[Factors | None]) -> torch.Tensor:
    """The merged ΔW of one module in adapter orientation (out x in_flat), before any SVD truncation.
    For factor-wise methods and lego this is B'A' of the merged factors."""
    if not opts.is_dense:
        A, B = merge_factors(opts, name, inputs)
        return B @ A
    idx = _present(inputs)
    ctx = TensorContext(name=name, seed=opts.seed)
    w = torch.tensor([float(opts.weights[i]) for i in idx])
    return combine(opts, torch.stack([inputs[i].delta() for i in idx]), w, ctx, idx)


def applied_delta(opts: CombineOptions, name: str, inputs: list[Factors | None]) -> torch.Tensor:
    """The ΔW a merge *into the base* adds: the dense merged ΔW (no SVD truncation) unless ``rank`` is set
    for an svd-family method, in which case the rank-``rank`` approximation the adapter would carry."""
    if opts.is_dense and opts.rank is not None:
        A, B = merge_factors(opts, name, inputs)
        return B @ A
    return dense_delta(opts, name, inputs)


def pick_replacement(name: str, vals: list[torch.Tensor], weights: list[float], policy: str, labels: list[str]) -> torch.Tensor:
    """One value for a full tensor (modules_to_save copy) that several adapters carry: the common value
    when they agree, else by ``policy``: error | first | average (Σ w_i T_i / Σ w_i)."""
    if len(vals) == 1 or policy == "first" or all(torch.equal(vals[0], v) for v in vals[1:]):
        return vals[0]
    if policy == "error":
        raise MergeError(
            f"adapters {labels[0]} and {labels[1]} both replace '{name}' (modules_to_save) with different values; "
            "choose --modules-to-save first or average"
        )
    if abs(sum(weights)) < 1e-12:
        raise MergeError(f"cannot average '{name}': the weights of the adapters that carry it sum to 0")
    return (sum(w * v.to(torch.float32) for w, v in zip(weights, vals)) / sum(weights)).to(vals[0].dtype)


def merge_factors(opts: CombineOptions, name: str, inputs: list[Factors | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged factors (A' r' x in_flat, B' out x r') of one module; the merged adapter has scaling 1."""
    idx = _present(inputs)
    m = opts.method
    if m in DENSE:
        rank = opts.rank or max(inputs[i].rank for i in idx)
        if m == "svd":  # Σ w_i ΔW_i = [c_i B_i] [A_i]: exact SVD from the factors, never forming ΔW
            stacked = (torch.cat([inputs[i].B * (opts.weights[i] * inputs[i].scale) for i in idx], dim=1),
                       torch.cat([inputs[i].A for i in idx], dim=0))
            A, B, _ = K.lowrank_factors(stacked, rank, split="us")
        else:
            A, B, _ = K.lowrank_factors(dense_delta(opts, name, inputs), rank, split="us", method=opts.svd_method)
        if opts.svd_clamp is not None:
            A, B = _clamp(A, B, opts.svd_clamp)
        return A, B
    if m == "cat":
        A = torch.cat([inputs[i].A * (opts.weights[i] * inputs[i].scale) for i in idx], dim=0)
        B = torch.cat([inputs[i].B for i in idx], dim=1)
        return A, B
    if m == "lego":
        from .lego import lego_merge

        return lego_merge(opts, name, inputs)
    # factor-wise (PEFT linear / ties / dare_* / magnitude_prune on the factors)
    r = max(inputs[i].rank for i in idx)
    c = [opts.weights[i] * inputs[i].scale for i in idx]
    wa = torch.tensor([(1.0 if ci >= 0 else -1.0) * abs(ci) ** 0.5 for ci in c])
    wb = torch.tensor([abs(ci) ** 0.5 for ci in c])
    As = torch.stack([_pad_rows(inputs[i].A, r) for i in idx])
    Bs = torch.stack([_pad_rows(inputs[i].B.T, r).T for i in idx])
    A = combine(opts, As, wa, TensorContext(name=f"{name}.lora_A", seed=opts.seed), idx)
    B = combine(opts, Bs, wb, TensorContext(name=f"{name}.lora_B", seed=opts.seed), idx)
    return A, B


def _pad_rows(x: torch.Tensor, r: int) -> torch.Tensor:
    if x.shape[0] == r:
        return x
    return torch.cat([x, x.new_zeros((r - x.shape[0],) + tuple(x.shape[1:]))], dim=0)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation, via kthvalue (no input-size limit)."""
    flat = x.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    vlo = torch.kthvalue(flat, lo + 1).values
    if lo + 1 >= flat.numel():
        return vlo
    vhi = torch.kthvalue(flat, lo + 2).values
    return vlo + (vhi - vlo) * (pos - lo)


def _clamp(A: torch.Tensor, B: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's svd_clamp: clamp both factors to [-h, h], h = the q-quantile of their joint entries."""
    hi = _quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), q)
    return A.clamp(-hi, hi), B.clamp(-hi, hi)
