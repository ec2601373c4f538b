"""Generalized task arithmetic (GTA): the pipeline shared by TIES, DARE, DELLA and Breadcrumbs.

For one tensor, with base theta_0, models theta_i, weights w_i and scale lambda::

    tau_i   = theta_i - theta_0                              task vectors
    tau_i  <- S(tau_i)                                       sparsify (DARE / DELLA / Breadcrumbs), optional
    tau_i  <- tau_i * 1[|tau_i| >= t_i]                      TIES trim (top-k magnitude), optional
    gamma   = sgn(sum_i v_i)   v_i = tau_i or w_i tau_i      sign election (consensus), optional
    delta   = agg_i { w_i tau_i : sgn(v_i) = gamma }         disjoint merge (mean / sum / max / weighted mean)
            | sum_i w_i tau_i [/ sum_i w_i]                  plain combination without consensus
    theta   = theta_0 + lambda * delta

Method files declare their parameters with the helpers below and call :meth:`Pipeline.merge`.
Whole-model (``scope: global``) trimming and the global majority sign come from
:mod:`._gta_stats`. Everything runs in float32 on ``ctx.device``; randomness only through
``ctx.generator(i)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from ..io import buffers
from . import _fused as _F
from . import _tensor_norms as TN
from . import _tensor_trim as TT
from ._tensor_trim import needs_selection, official_rank  # noqa: F401  (the trim's rank rules; _gta_stats uses them)
from . import _sampling as _S
from . import kernels as K
from .base import MergeError, Param, Params, TensorContext

# --------------------------------------------------------------------------------------------------
# Parameters with validation at resolution time (the planner resolves every tensor's parameters
# before any weight is read, so a bad value fails there with one line).


@dataclass(frozen=True)
class Bounded(Param):
    """A float parameter restricted to [lo, hi]."""

    lo: float | None = None
    hi: float | None = None

    def coerce(self, value, where):
        v = super().coerce(value, where)
        if v is None:
            return v
        if math.isnan(v) or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"
            raise MergeError(f"parameter '{self.name}' {where}: {v:g} is outside [{lo}, {hi}]")
        return v


@dataclass(frozen=True)
class Rescale(Param):
    """A rescale mode. mergekit's booleans are accepted: true -> ``l1`` (its RescaleNorm.l1), false -> ``none``."""

    def coerce(self, value, where):
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            value = "l1" if value else "none"
        elif isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = "l1" if value.strip().lower() == "true" else "none"
        return super().coerce(value, where)


def weight_param() -> Param:
    return Param("weight", float, 1.0, scope="model", help="per-model weight w_i")


def density_param(default: float, help: str) -> Param:
    return Bounded("density", float, default, scope="model", help=help, lo=0.0, hi=1.0)


def lambda_param(default: float, help: str = "scale of the merged task vector") -> Param:
    return Param("lambda", float, default, help=help)


def rescale_param(default: str, choices: tuple, help: str) -> Param:
    return Rescale("rescale", str, default, help=help + " (mergekit's true/false = l1/none)", choices=choices)


def normalize_param(default, consensus: bool) -> Param:
    if consensus:
        h = "mergekit switch, overrides agg: true = weighted mean over agreeing models, false = sum"
    else:
        h = "divide the weighted sum by sum_i w_i (mergekit normalize)"
    return Param("normalize", bool, default, help=h)


def int8_mask_param() -> Param:
    return Param("int8_mask", bool, False, help="accepted for mergekit recipes; no effect (masks are bool here)")


def trim_params(scope_default: str = "global") -> tuple[Param, ...]:
    return (
        Param("scope", str, scope_default, choices=("global", "tensor"),
              help="top-k over the whole model (paper, exact, streaming) or per tensor (mergekit/PEFT); a "
                   "recipe with a per-layer density and no scope gets tensor (with a warning)"),
        Param("exact_topk", bool, False,
              help="tensor scope: keep exactly max(1, floor(k n)) by topk (mergekit) instead of the official "
                   "|tau| >= (n - floor(k n))-th smallest (ties kept)"),
    )


def consensus_params(*, elect: str = "mass", agg: str = "mean", zero_sign: str = "majority",
                     weighted_elect: bool = False, normalize=None) -> tuple[Param, ...]:
    return (
        Param("elect", str, elect, choices=("mass", "count"),
              help="sign rule: sgn(sum of deltas) (paper) or sgn(sum of signs)"),
        Param("agg", str, agg, choices=("mean", "sum", "max", "weighted_mean"),
              help="disjoint merge: mean over agreeing non-zeros (paper), sum, max magnitude, or sum/sum of agreeing weights"),
        normalize_param(normalize, consensus=True),
        Param("zero_sign", str, zero_sign, choices=("majority", "positive"),
              help="elected sign 0 -> majority sign sgn(sum gamma) (official TIES) or +1 (mergekit)"),
        Param("weighted_elect", bool, weighted_elect,
              help="elect the sign from the weighted deltas w_i tau_i (mergekit) instead of tau_i"),
    )


# --------------------------------------------------------------------------------------------------
# Trim thresholds (official TIES rule)


def tensor_threshold(x: torch.Tensor, density: float) -> float | None:
    """The official TIES threshold of one tensor (None = keep all): exact, by radix selection."""
    from ._radix import kth_smallest

    r = official_rank(x.numel(), density)
    if r <= 0:
        return None
    return kth_smallest(x.abs(), r, nonneg=True)


# --------------------------------------------------------------------------------------------------
# The pipeline

DEFERRED = "deferred"  # ctx.stats["major"] when the executor settles the majority sign after the last tensor

Sparsifier = Callable[[TensorContext, int, torch.Tensor, Params], torch.Tensor]


@dataclass(frozen=True)
class Pipeline:
    """One GTA method: an optional sparsifier, an optional TIES trim (reading its density from the
    per-model parameter named ``trim``), and whether a sign consensus runs."""

    name: str
    sparsify: Sparsifier | None = None
    trim: str | None = None
    consensus: bool = False
    trim_rescale: bool = False  # apply p["rescale"] (l1/l2) after the trim (ties)
    check: Callable[[Params], None] | None = None  # cross-parameter validation
    # block form of the sparsifier: (ctx, i, p, row) -> fn(block, start) in place, or None (whole tensor
    # only); row = length of the last dim; row_blocks: blocks must hold whole rows (per-row statistics)
    block_sparsify: Callable | None = None
    row_blocks: bool = False
    # the engine may settle the global majority sign after the last tensor (``deferred``: it patches the
    # *output* with values this pipeline records): False for methods that transform the pipeline's result
    # (consensus_ties masks it), which then get the ``major`` statistics pass instead
    defer_sign: bool = True

    # -- statistics hook for register(stats=...) --------------------------------------------------
    def stats_for(self, p: Params):
        from ._gta_stats import GTAStats

        s = GTAStats(self)
        return s if s.passes(p) > 0 else None

    def stat_steps(self, p: Params) -> list[str]:
        """Whole-model passes this tensor's parameters need: ``sample``/``window`` (global trim
        thresholds; see ``_gta_stats``), ``major`` (global majority sign)."""
        if self.trim is None or p.get("scope") != "global":
            return []
        out = ["sample", "window"] if any(needs_selection(float(d)) for d in p[self.trim]) else []
        if self.consensus and p.get("zero_sign") == "majority":
            out.append("major")
        return out

    def chunkable(self, p: Params, name: str = "", shape: tuple = ()) -> bool:
        """Row chunks (dim 0) give the same result when every statistic is per element, per row, or
        from the whole-model pass: not with l1/l2 rescaling, per-tensor top-k, a per-tensor majority
        sign, or tensor-wide breadcrumbs ranking."""
        if p.get("rescale", "none") in ("l1", "l2"):
            return False
        selects = self.trim is not None and any(needs_selection(float(d)) for d in p[self.trim])
        if p.get("scope") == "tensor" and (self.trim is None or selects):  # per-tensor ranking / top-k
            return False
        if self.consensus and p.get("zero_sign", "positive") == "majority" and "major" not in self.stat_steps(p):
            return False
        return True

    def sum_phases(self, p: Params) -> int:
        """Sums phases (``MethodSpec.sums``) of a tensor too big to hold whole, where one per-tensor statistic
        is all that needs the whole tensor: the sparsifier's l1/l2 rescale (its norms, one pass over the row
        chunks: ``_tensor_norms``), or the per-tensor trim (two histogram passes: ``_tensor_trim``)."""
        if self.sparsify is not None:
            if self.trim_rescale or p.get("rescale", "none") not in ("l1", "l2"):
                return 0
            return 1 if self.chunkable(Params({**p, "rescale": "none"})) else 0
        if self.trim is None or p.get("scope") != "tensor":
            return 0
        if p.get("rescale", "none") not in ("none", None):
            return 0
        if self.consensus and p.get("zero_sign", "positive") == "majority":
            return 0
        return 2 if any(needs_selection(float(d)) for d in p[self.trim]) else 0

    def sums(self, ctx: TensorContext, base: torch.Tensor, models: list[torch.Tensor], p: Params):
        """One row chunk's part of sums phase ``ctx.phase`` (see :meth:`sum_phases`)."""
        if self.sparsify is not None:
            return TN.collect(self.sparsify, ctx, base, models, p)
        b = base.to(torch.float32)
        taus = [m.to(torch.float32) - b for m in models]  # the apply's float32 task vectors of this chunk
        return TT.collect(ctx.phase, ctx.chunk, taus, p[self.trim], ctx.sums)

    def finish_sums(self, phase: int, previous, total, p: Params):
        if self.sparsify is not None:
            return TN.finish(total, p)
        return TT.finish(phase, previous, total, p[self.trim], bool(p.get("exact_topk")))

    def validate(self, p: Params) -> None:
        if self.trim is not None and p.get("scope") == "global" and p.get("exact_topk"):
            raise MergeError(f"{self.name}: exact_topk needs scope: tensor (global scope keeps the official ties at the threshold)")
        if self.check is not None:
            self.check(p)

    # -- stages ----------------------------------------------------------------------------------
    def deltas(self, ctx: TensorContext, base: torch.Tensor, models: list[torch.Tensor], p: Params,
               thresholds: list | None = None, trim: bool = True) -> list[torch.Tensor]:
        """Sparsified and trimmed task vectors. ``thresholds``: per-model global thresholds (scope global)."""
        out = []
        for i, m in enumerate(models):
            t = m.sub_(base) if ctx.owned else m - base  # owned: the engine's own copy, used once
            if self.sparsify is not None:
                t = self.sparsify(ctx, i, t, p)
            if trim and self.trim is not None:
                t = self._trim(t, i, p, thresholds)
            out.append(t)
        return out

    def _trim(self, t: torch.Tensor, i: int, p: Params, thresholds) -> torch.Tensor:
        d = p[self.trim][i]
        if d >= 1:
            return t
        if d <= 0:
            return torch.zeros_like(t)
        if p.get("exact_topk") and thresholds is None:
            kept = t * K.topk_mask(t, d, exact=True)
        else:
            thr = thresholds[i] if thresholds is not None else tensor_threshold(t, d)
            kept = t if thr is None else K.trim_below(t, thr)
        if self.trim_rescale and p.get("rescale", "none") != "none":
            kept = K.rescale(t, kept, p["rescale"])
        return kept

    def combine_deferred(self, taus: list[torch.Tensor], p: Params, rec):
        """:meth:`combine` with the global majority sign not known yet (``deferred``): merge with the
        tentative fill +1, vote this tensor's sum of elected signs, and return (delta, idx, alt): the
        flat indices where the elected sign is 0 yet some vote is non-zero (exact cancellation; the
        fill matters only there) and the delta values a fill of -1 gives at them."""
        w = p["weight"]
        weighted, votes, sign = self.elect(taus, p)
        rec.vote(int(sign.sum(dtype=torch.float64).item()))  # exact: entries are -1, 0, 1
        zero = sign.abs().neg_().add_(1.0)  # 1 where the elected sign is 0
        sign.add_(zero)  # fill +1 (the same values as K.fill_zeros(sign, 1.0))
        agg = self._agg(p)
        delta, count = K.disjoint_merge_list(weighted, sign, agg, weights=w, votes=votes, with_count=True)
        # with fill +1 a coordinate of sign 0 counts its positive votes: > 0 iff a non-zero vote exists
        idx = torch.nonzero(zero.mul_(count).reshape(-1)).reshape(-1)
        if idx.numel() == 0:
            return delta, idx, None
        pick = [x.reshape(-1)[idx] for x in weighted]
        pick_votes = None if votes is weighted else [v.reshape(-1)[idx] for v in votes]
        minus = torch.full((idx.numel(),), -1.0, dtype=delta.dtype, device=delta.device)
        return delta, idx, K.disjoint_merge_list(pick, minus, agg, weights=w, votes=pick_votes)

    def elect(self, taus: list[torch.Tensor], p: Params):
        """(weighted deltas, votes, raw elected sign with zeros left in); lists of tensors, never
        stacked (an [N, ...] stack costs N full-size copies per step)."""
        w = p["weight"]
        weighted = taus if all(x == 1.0 for x in w) else [t * wi for t, wi in zip(taus, w)]
        votes = weighted if p.get("weighted_elect") else taus
        return weighted, votes, K.elect_sign_list(votes, p.get("elect", "mass"))

    def fill_zero_sign(self, sign: torch.Tensor, p: Params, major: float | None) -> torch.Tensor:
        if p.get("zero_sign", "positive") == "positive":
            fill = 1.0
        else:
            fill = major if major is not None else float(torch.sign(sign.sum(dtype=torch.float64)))
            fill = fill if fill != 0 else 1.0
        return K.fill_zeros(sign, fill)

    @staticmethod
    def _agg(p: Params) -> str:
        norm = p.get("normalize")
        return p.get("agg", "mean") if norm is None else ("weighted_mean" if norm else "sum")

    def combine(self, taus: list[torch.Tensor], p: Params, major: float | None = None) -> torch.Tensor:
        w = p["weight"]
        if self.consensus:
            weighted, votes, sign = self.elect(taus, p)
            sign = self.fill_zero_sign(sign, p, major)
            return K.disjoint_merge_list(weighted, sign, self._agg(p), weights=w, votes=votes)
        delta = torch.zeros_like(taus[0])
        for wi, t in zip(w, taus):
            delta.add_(t if wi == 1 else t * wi)  # not add_(alpha=): that may fuse the multiply-add
        if p.get("normalize"):
            total = sum(w)
            if abs(total) >= 1e-8:  # mergekit: a weight sum of ~0 divides by 1
                delta.div_(total)
        return delta

    # -- the method ------------------------------------------------------------------------------
    def raw_inputs(self, p: Params, shape: tuple = ()) -> bool:
        """Whether the engine may hand this tensor's inputs in their stored dtype (MethodSpec.raw_inputs):
        when the fused kernels can take them (``_fused``; tensors of two blocks or more); :meth:`merge`
        converts them otherwise."""
        if not fused_size(math.prod(shape)):
            return False
        if self.sparsify is not None and self.block_sparsify is None:
            return False
        if self.consensus and self._agg(p) == "max":
            return False
        return not (self.trim_rescale and p.get("rescale", "none") not in ("none", None))

    def merge(self, ctx: TensorContext, base: torch.Tensor, models: list[torch.Tensor], p: Params) -> torch.Tensor:
        self.validate(p)
        if base.numel() == 0:
            return base.to(torch.float32, copy=True)
        if ctx.raw:  # stored dtypes (raw_inputs): the fused path reads them, everything else gets float32 copies
            if not fused_inputs(base, models):
                ctx, base, models = float32_inputs(ctx, base, models)
        thresholds, major = None, None
        steps = self.stat_steps(p)
        if steps:
            st = ctx.stats
            if not isinstance(st, dict) or st.get("method") != self.name:
                raise MergeError(f"{self.name}: scope global needs the whole-model statistics pass (or set scope: tensor)")
            if "window" in steps:
                thresholds = st.get("thr")
                if thresholds is None or [float(x) for x in p[self.trim]] != st.get("density"):
                    raise MergeError(f"{self.name}: scope global needs one '{self.trim}' per model for the whole model "
                                     f"(got {p[self.trim]} at {ctx.name}); use scope: tensor for per-layer values")
            if "major" in steps:
                major = st.get("major")
                if major is None:
                    raise MergeError(f"{self.name}: scope and zero_sign must be the same for every tensor")
        if self.blockable(p, base, major, thresholds):
            fns = self.block_sparsifiers(ctx, p, base, len(models))
            if fns is not None and not self._tensor_thresholds_needed(p, thresholds):
                return self._merge_blocks(ctx, base, models, p, thresholds, major, fns)  # tau formed per block
            if ctx.raw:
                ctx, base, models = float32_inputs(ctx, base, models)
            taus = self.deltas(ctx, base, models, p, trim=False)
            patch = None
            trims, chunk = (ctx.sums, ctx.chunk) if isinstance(ctx.sums, TT.Trims) else (None, 0)  # a streamed tensor
            if trims is None and self.trim is not None and thresholds is None and p.get("exact_topk"):
                trims = TT.select(taus, p[self.trim], exact=True)  # mergekit's exact top-k of a tensor held whole
            if trims is not None:
                thresholds, ties = TT.chunk_ties(taus, trims, chunk)
                patch = self._tie_patch(base, taus, p, thresholds, ties, major)  # before taus change in place
            elif self.trim is not None and thresholds is None:  # tensor scope: the whole tensor's thresholds
                thresholds = [tensor_threshold(t, d) if needs_selection(d) else None
                              for t, d in zip(taus, p[self.trim])]
            out = self._merge_blocks(ctx, base, taus, p, thresholds, major)
            if patch is not None:
                out.view(-1)[patch[0]] = patch[1].to(out.dtype)
            return out
        if ctx.raw:
            ctx, base, models = float32_inputs(ctx, base, models)
        if isinstance(ctx.sums, TT.Trims):  # a row chunk: the whole tensor's bounds, and this chunk's kept ties
            untrimmed = self.deltas(ctx, base, models, p, trim=False)
            bounds, ties = TT.chunk_ties(untrimmed, ctx.sums, ctx.chunk)
            taus = []
            for i, (t, tie) in enumerate(zip(untrimmed, ties)):
                kept = self._trim(t, i, p, bounds)
                if tie is not None:
                    kept.view(-1)[tie] = t.reshape(-1)[tie]
                taus.append(kept)
        else:
            taus = self.deltas(ctx, base, models, p, thresholds)
        if major == DEFERRED:
            if ctx.defer is None:
                raise RuntimeError(f"{self.name}: the majority sign was deferred but ctx.defer is not set")
            delta, idx, alt = self.combine_deferred(taus, p, ctx.defer)
            if alt is not None:  # the same float ops as the full tensor below, on the recorded coordinates
                ctx.defer.alternative(idx, _scale(alt, p["lambda"]).add_(base.reshape(-1)[idx]))
        else:
            delta = self.combine(taus, p, major)
        return _scale(delta, p["lambda"]).add_(base)

    # -- block by block (CPU) ----------------------------------------------------------------------
    def blockable(self, p: Params, base: torch.Tensor, major, thresholds) -> bool:
        """Whether trim, election and merge may run block by block: every step after the sparsifier is
        per element given the thresholds and the majority sign (not with l1/l2 rescaling after the
        trim or a per-tensor majority sign; mergekit's exact top-k patches its kept ties after the blocks)."""
        if not blocks_apply(base):
            return False
        if self.trim_rescale and p.get("rescale", "none") not in ("none", None):
            return False
        if self.consensus and p.get("zero_sign", "positive") == "majority" and major is None:
            return False
        return True

    def block_sparsifiers(self, ctx: TensorContext, p: Params, base: torch.Tensor, n: int) -> list | None:
        """Per-model block functions that form tau_i block by block (identity without a sparsifier),
        or None when the sparsifier needs the whole tensor."""
        if self.sparsify is None:
            return [None] * n
        if self.block_sparsify is None:
            return None
        row = base.shape[-1] if base.dim() else 1
        fns = [self.block_sparsify(ctx, i, p, row) for i in range(n)]
        return None if any(f is None for f in fns) else fns

    def block_step(self, base: torch.Tensor) -> int:
        """Elements per block: ``_sampling.BLOCK``, rounded down to whole rows (at least one) if ``row_blocks``."""
        if not self.row_blocks or base.dim() == 0:
            return _S.BLOCK
        row = max(1, base.shape[-1])
        return max(1, _S.BLOCK // row) * row

    def _tie_patch(self, base: torch.Tensor, taus: list[torch.Tensor], p: Params, thresholds, ties, major):
        """(flat indices, merged float32 values) where an exact top-k keeps some of the entries tied at its
        threshold, which the blocks (trimming strictly above it) drop: the whole-tensor path's float32
        operations on those coordinates only. None when no kept tie can change the merge."""
        idx = [t for t in ties if t is not None and t.numel()]
        if not idx:
            return None
        idx = torch.unique(torch.cat(idx))  # sorted
        block = []
        for t, thr, tie in zip(taus, thresholds, ties):
            x = t.reshape(-1)[idx]
            if thr is not None:  # keep |x| > thr (thr is the kept-above bound) and this model's kept ties
                keep = x.abs() >= thr
                if tie is not None and tie.numel():
                    keep |= torch.isin(idx, tie)
                x = torch.where(keep, x, 0.0)
            block.append(x)
        d = [float(x) for x in p[self.trim]]
        block = [torch.zeros_like(x) if dd <= 0 else x for x, dd in zip(block, d)]
        return idx, _scale(self.combine(block, p, major), p["lambda"]).add_(base.reshape(-1)[idx].to(torch.float32))

    def _tensor_thresholds_needed(self, p: Params, thresholds) -> bool:
        return self.trim is not None and thresholds is None and any(needs_selection(float(d)) for d in p[self.trim])

    def fused_args(self, p: Params, thresholds, major) -> tuple | None:
        """The per-tensor arguments of ``_fused.combine`` (trim kinds, hardshrink bounds, weights, switches),
        or None where the kernel does not apply (numba unavailable, ``agg: max``)."""
        if not _F.enabled():
            return None
        w = [float(x) for x in p["weight"]]
        n = len(w)
        kind, below = np.zeros(n, np.int8), np.zeros(n, np.float32)
        if self.trim is not None:
            for i, d in enumerate(p[self.trim]):
                if d <= 0:
                    kind[i] = _F.ZERO
                elif d < 1 and thresholds is not None and thresholds[i] is not None:
                    kind[i] = _F.THRESHOLD  # as K.trim_below: keep |t| > nextafter(thr, 0)
                    below[i] = np.nextafter(np.float32(thresholds[i]), np.float32(0.0))
        agg, fill, norm = self._agg(p), 1.0, 0.0
        if self.consensus:
            if agg not in _F.AGG:
                return None
            if p.get("zero_sign", "positive") == "majority" and major != DEFERRED:
                fill = float(major) if major else 1.0
        elif p.get("normalize") and abs(sum(w)) >= 1e-8:
            norm = sum(w)
        lam = float(p["lambda"])
        return (kind, below, np.array(w, np.float32), all(x == 1.0 for x in w), self.consensus,
                p.get("elect", "mass") == "count", bool(p.get("weighted_elect")), _F.AGG.get(agg, 0), np.float32(fill),
                major == DEFERRED, np.float32(norm), np.float32(lam), lam != 1)

    def _merge_blocks(self, ctx: TensorContext, base: torch.Tensor, taus: list[torch.Tensor], p: Params,
                      thresholds, major, fns: list | None = None) -> torch.Tensor:
        """Trim, elect, merge and add the base on blocks of ``_sampling.BLOCK`` elements spread over the
        kernel threads: the operations of the whole-tensor path on each block (bit-identical results),
        with cache-resident temporaries instead of a dozen memory-bound full-size passes. ``fns``
        (from :meth:`block_sparsifiers`): ``taus`` are the models, and each block's task vectors are
        formed and sparsified in the block. Deferred majority signs: the blocks' votes and alternatives
        are handed to ``ctx.defer`` in block order."""
        args = self.fused_args(p, thresholds, major)
        # the fused kernel's output never aliases the base it reads (nor a base in a stored dtype); it is
        # written in bf16 directly when that is what the engine stores
        narrow = args is not None and ctx.out_dtype == torch.bfloat16
        out = base if ctx.owned and args is None else \
            buffers.empty(base.shape, torch.bfloat16 if narrow else torch.float32)
        flat_out, flat_base = out.view(-1), base.reshape(-1)
        flat = [t.reshape(-1) for t in taus]
        deferred = major == DEFERRED
        if deferred and ctx.defer is None:
            raise RuntimeError(f"{self.name}: the majority sign was deferred but ctx.defer is not set")
        lam = p["lambda"]
        records: dict[int, tuple] = {}
        if args is not None:  # one fused kernel per block (``_fused``): the same float32 operations
            # tau never materialised: bf16 inputs, no sparsifier or DARE's draw (done inside the kernel)
            direct = fns is not None and all(in_kernel(f) for f in fns) and \
                all(t.dtype == torch.bfloat16 for t in [flat_base, *flat])
            drops = _F.drop_args([f.draw if f is not None else (1.0, 0) for f in fns]
                                 if any(f is not None for f in fns) else None, len(flat)) if direct else None
            # numpy views made once per tensor: per block, torch slicing and .numpy() cost microseconds
            # each, under the GIL that the other kernel thread then waits for
            arrs = [_F.host_array(t) for t in flat]
            base_arr, out_arr = _F.host_array(flat_base), _F.host_array(flat_out)

            def fused(a: int, b: int) -> None:
                ai = _F.scratch_np(-2, b - a if deferred else 0, np.int64)
                av = _F.scratch_np(-3, b - a if deferred else 0)
                o = _F.scratch_np(-5, b - a) if narrow else out_arr[a:b]
                if direct:
                    votes, nalt = _F.combine_bf16([m[a:b] for m in arrs], base_arr[a:b], drops, a, *args, o, ai, av)
                else:
                    votes, nalt = blocks_combine(a, b, o, ai, av)
                if narrow:
                    _F.narrow_into(o, out_arr[a:b])
                records[a] = (votes, torch.from_numpy(ai[:nalt].copy()), torch.from_numpy(av[:nalt].copy()) if nalt else None)

            # row rankers form tau from the bf16 bits of model and base in their first pass, and the combine
            # widens the base per sub-block: no float32 copy of the base block is made (a pass over memory)
            base_bits = fns is not None and base_arr.dtype == np.int16 and all(
                getattr(f, "from_bits", None) is not None for f in fns) and all(m.dtype == np.int16 for m in arrs)

            def blocks_combine(a: int, b: int, o, ai, av):
                bb = base_arr[a:b] if base_bits else _F.float32_block(base_arr[a:b])  # scratch slot 0; taus 1..n
                block = tuple(t[a:b] for t in arrs) if fns is None else \
                    tuple(tau_block(m[a:b], bb, fn, a, slot=i + 1) for i, (m, fn) in enumerate(zip(arrs, fns)))
                return _F.combine(block, bb, *args, o, ai, av)

        def work(a: int, b: int) -> None:
            bb = flat_base[a:b]
            block = [t[a:b] for t in flat] if fns is None else [block_tau(m[a:b], bb, fn, a) for m, fn in zip(flat, fns)]
            if self.trim is not None:
                block = [self._trim(t, i, p, thresholds) for i, t in enumerate(block)]
            if deferred:
                rec = _BlockVotes()
                delta, idx, alt = self.combine_deferred(block, p, rec)
                alt = None if alt is None else _scale(alt, lam).add_(bb[idx])
                records[a] = (rec.total, idx, alt)
            else:
                delta = self.combine(block, p, major)
            flat_out[a:b] = _scale(delta, lam).add_(bb)

        _S.run_blocks(flat_out.numel(), self.block_step(base), work if args is None else fused)
        if deferred:  # one tally and one set of alternatives per tensor (a call per block cost ~0.1 ms of GIL each)
            starts = sorted(records)
            ctx.defer.vote(sum(int(records[a][0]) for a in starts))
            alts = [(records[a][1] + a, records[a][2]) for a in starts if records[a][2] is not None]
            if alts:
                ctx.defer.alternative(torch.cat([i for i, _ in alts]), torch.cat([v for _, v in alts]))
        return out


def fused_size(n: int) -> bool:
    """Whether a tensor of ``n`` elements goes to the fused kernels: two blocks or more, numba usable."""
    return n >= 2 * _S.BLOCK and _F.enabled(n)


def fused_shape(p: Params, shape: tuple) -> bool:
    """``raw_inputs`` of the element-wise methods with a block kernel: the tensors the kernels take."""
    return fused_size(math.prod(shape))


def kernel_blocks(inputs: list[torch.Tensor], out_dtype, kernel: Callable) -> torch.Tensor:
    """``kernel(blocks, out)`` block by block over the kernel threads: ``blocks`` the block of each input as
    numpy, the bf16 bits (int16) when every input is stored in bf16 (the kernels widen them in their own loop,
    ``_fused_kernels.f32_at``), else float32 values (float32 views, or bf16 widened into per-thread scratch);
    ``out`` the float32 output block; bf16 output (``out_dtype``) is rounded straight into the result."""
    narrow = out_dtype == torch.bfloat16
    out = buffers.empty(inputs[0].shape, torch.bfloat16 if narrow else torch.float32)
    fo, read = _F.host_array(out.view(-1)), _block_reader(inputs)

    def block(a: int, b: int) -> None:
        o = _F.scratch_np(-5, b - a) if narrow else fo[a:b]
        kernel(read(a, b), o)
        if narrow:
            _F.narrow_into(o, fo[a:b])

    _S.run_blocks(out.numel(), _S.BLOCK, block)
    return out


def kernel_sums(inputs: list[torch.Tensor], shape: tuple, kernel: Callable) -> np.ndarray:
    """The sum over blocks of ``kernel(blocks, acc)``, which adds one block's counts into ``acc`` (a zeroed int64
    array of ``shape``): blocks as :func:`kernel_blocks` hands them, over the kernel threads, each block into its
    own ``acc``."""
    n = inputs[0].numel()
    read = _block_reader(inputs)
    parts = np.zeros((max(1, -(-n // _S.BLOCK)),) + tuple(shape), np.int64)
    _S.run_blocks(n, _S.BLOCK, lambda a, b: kernel(read(a, b), parts[a // _S.BLOCK]))
    return parts.sum(0)


def _block_reader(inputs: list[torch.Tensor]) -> Callable[[int, int], list]:
    """(a, b) -> every input's flat block a:b as the kernels read it: the bf16 bits (int16) when every input is
    stored in bf16, else float32 values (views, or bf16 widened into per-thread scratch)."""
    # numpy views made once per tensor, as in Pipeline._merge_blocks (torch slicing costs ~us under the GIL)
    flat = [_F.host_array(t.reshape(-1)) for t in inputs]
    if all(t.dtype == np.int16 for t in flat):
        return lambda a, b: [t[a:b] for t in flat]
    return lambda a, b: [_F.float32_block(t[a:b], slot=i) for i, t in enumerate(flat)]


def fused_inputs(base: torch.Tensor, models: list[torch.Tensor]) -> bool:
    """Whether these inputs (raw: as stored) can go to the fused block kernels as they are."""
    return fused_size(base.numel()) and all(_F.raw_ok(t) for t in [base, *models])


def blocks_apply(base: torch.Tensor) -> bool:
    """Whether a tensor goes block by block at all: on the CPU, at least two blocks, float32 (or a stored
    dtype the fused kernels read: ``_fused.raw_ok``)."""
    if base.device.type != "cpu" or base.numel() < 2 * _S.BLOCK:
        return False
    return base.dtype == torch.float32 or (_F.raw_ok(base) and _F.enabled(base.numel()))


def in_kernel(fn) -> bool:
    """A block sparsifier the fused bf16 kernels apply in their own loop: none, or DARE's draw."""
    return fn is None or isinstance(fn, _S.DropBlock)


def float32_inputs(ctx: TensorContext, base: torch.Tensor, models: list[torch.Tensor]):
    """(ctx, base, models) with float32 copies of inputs handed in their stored dtype (``ctx.raw``),
    which the method then owns."""
    ctx = replace(ctx, raw=False, owned=True)
    return ctx, base.to(torch.float32, copy=True), [m.to(torch.float32, copy=True) for m in models]


def block_tau(m: torch.Tensor, base: torch.Tensor, fn, start: int, slot: int | None = None) -> torch.Tensor:
    """tau = m - base on one block (``m`` float32 or a stored dtype, ``base`` float32), sparsified in place
    by ``fn(tau, start)`` (None: not sparsified). ``slot``: write it into that ``_fused.scratch`` buffer."""
    t = _F.sub(m, base, slot) if _F.enabled() else torch.sub(m, base)
    if fn is not None:
        fn(t, start)
    return t


def tau_block(m: np.ndarray, base: np.ndarray, fn, start: int, slot: int) -> np.ndarray:
    """:func:`block_tau` on numpy blocks for the fused kernels (``m``: ``_fused.host_array`` block, ``base``
    float32, or bf16 bits for a sparsifier with ``from_bits``), in scratch ``slot``. A sparsifier with
    ``from_bits`` (the row rankers of ``_rank``) forms tau from the bf16 bits in its own first pass."""
    t = _F.scratch_np(slot, base.size)
    from_bits = getattr(fn, "from_bits", None)
    if from_bits is not None and m.dtype == np.int16:
        from_bits(m, base, t, start)
        return t
    _F.sub_into(m, base, t)
    if fn is not None:
        fn(torch.from_numpy(t), start)
    return t


class _BlockVotes:
    """Collects one block's tally (``combine_deferred``'s ``rec``) in a worker thread."""

    def __init__(self):
        self.total = 0

    def vote(self, n: int) -> None:
        self.total += int(n)


def _scale(x: torch.Tensor, lam: float) -> torch.Tensor:
    """x * lambda in place (skipped for lambda = 1: x * 1 == x exactly)."""
    return x if lam == 1 else x.mul_(lam)
