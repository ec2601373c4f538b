"""Whole-model statistics for ``scope: global`` TIES trimming (exact, streaming).

The official TIES code flattens each task vector over the whole model and keeps
``|tau_i| >= t_i`` with ``t_i`` the ``(P - floor(k_i P))``-th smallest ``|tau_i|`` (P = number of
merged parameters). We find every ``t_i`` exactly without holding a task vector. Keys are the
float32 bit patterns of ``|tau_i|`` (for non-negative IEEE-754 floats integer order is value order):

* pass ``sample``: per model, a histogram of the high 16 key bits over about one row in
  ``SAMPLE_STRIDE`` of every tensor (the engine reads only those rows). It brackets the wanted
  quantile 1 - k_i with a wide margin: a window of at most ``MAX_WINDOW`` high buckets.
* pass ``window`` (every element): the exact count of keys below the window, and the exact histogram
  of the keys inside it. When the rank falls inside (the normal case) this is the exact threshold,
  bit-identical to ``torch.kthvalue`` of the concatenated vector.
* only if the sample missed (the rank lies outside the window): passes ``high`` (high 16 bits of every
  key) and ``low`` (low 16 bits inside the found bucket) redo the selection exactly for those models.
* pass ``major`` (when ``zero_sign: majority``): the official fallback for coordinates whose elected
  sign is 0 is the *global* majority sign ``sgn(sum_p gamma_p)`` over the whole trimmed model, so the
  signed count of elected signs is summed over every tensor. The engine skips this pass
  (:meth:`GTAStats.defer`): its apply pass tallies the signs and patches the few coordinates where
  the fill matters after the last tensor (``mergesmith.deferred``).

So the exact global threshold costs one full read plus a ~1/16 sampled read instead of two full
reads. The histogram helpers are in ``_radix`` (tensor scope uses the same selection in memory, so a
one-tensor model gives bit-identical thresholds in both scopes). Partials are sparse histograms
(non-zero buckets only) or one integer per tensor; the state is a few numbers per model. Sparsifiers
before the trim (DARE in ``dare_ties``) are recomputed identically in every full pass from
``ctx.generator`` (the sampled pass draws its own masks: it only estimates).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _fused as _F
from . import _sampling as _S
from ._gta import (DEFERRED, block_tau, blocks_apply, float32_inputs, fused_inputs, in_kernel, needs_selection,
                   official_rank, tau_block)
from .kernels import bits_to_float
from ._radix import (_OFFSET, abs_window_hist, dense, high_hist, key_value, keys, locate, low_hist, window_merge,
                     window_part)
from .base import GlobalStats, MergeError, Params

SAMPLE_STRIDE = 16  # the sample pass reads ~1 row in 16 of every tensor
MAX_WINDOW = 8  # at most 8 high buckets (8 x 65536 exact bins) in the window pass


class GTAStats(GlobalStats):
    """Global trim thresholds and majority sign for a :class:`~._gta.Pipeline`."""

    def __init__(self, pipe):
        self.pipe = pipe

    def passes(self, params: Params, state=None) -> int:
        return len(state["steps"]) if state is not None else len(self.pipe.stat_steps(params))

    def sample_stride(self, pass_index, state) -> int:
        return SAMPLE_STRIDE if state["steps"][pass_index] == "sample" else 0

    def init(self, params: Params, num_models: int):
        self.pipe.validate(params)
        return {"method": self.pipe.name, "steps": list(self.pipe.stat_steps(params)), "count": 0,
                "density": None, "window": None, "redo": [], "bucket": None, "thr": None, "major": None}

    def defer(self, state):
        """The executor patches outputs after the last tensor: settle the majority sign there
        (``deferred``) instead of in a full ``major`` pass (not for pipelines with ``defer_sign`` false)."""
        if "major" not in state["steps"] or not self.pipe.defer_sign:
            return state
        return {**state, "steps": [s for s in state["steps"] if s != "major"], "major": DEFERRED}

    # -- collect -----------------------------------------------------------------------------------
    def collect(self, pass_index, state, ctx, base, models, p):
        step = state["steps"][pass_index]
        if base.numel() == 0:
            return None
        dens = [float(d) for d in p[self.pipe.trim]]
        fused_window = step == "window" and blocks_apply(base) and (not ctx.raw or fused_inputs(base, models))
        if step == "sample" and _F.enabled(base.numel()) and all(_F.raw_ok(t) for t in [base, *models]):
            fns = self.pipe.block_sparsifiers(ctx, p, base, len(models))
            if fns is not None and all(in_kernel(f) for f in fns):
                return self._fused_sample(base, models, dens, ctx.name, fns)
        if ctx.raw and not fused_window:  # stored dtypes (MethodSpec.raw_inputs): float32 copies
            ctx, base, models = float32_inputs(ctx, base, models)
        if step == "major":
            if any(needs_selection(d) for d in dens) and (state["thr"] is None or dens != state["density"]):
                raise MergeError(self._mixed(dens, ctx.name))
            taus = self.pipe.deltas(ctx, base, models, p, thresholds=state["thr"])
            _, _, sign = self.pipe.elect(taus, p)
            return int(sign.sum(dtype=torch.float64).item())  # exact: entries are -1, 0, 1
        if fused_window:
            fns = self.pipe.block_sparsifiers(ctx, p, base, len(models))
            if fns is None and ctx.raw:
                ctx, base, models = float32_inputs(ctx, base, models)
            if fns is not None:
                hists = _window_blocks(base, models, fns, [state["window"][i] if needs_selection(d) else None
                                                           for i, d in enumerate(dens)], self.pipe.block_step(base))
                return {"numel": base.numel(), "density": dens, "hist": hists, "name": ctx.name}
        taus = self.pipe.deltas(ctx, base, models, p, trim=False)
        hists = []
        for i, t in enumerate(taus):
            if not needs_selection(dens[i]) or (step in ("high", "low") and i not in state["redo"]):
                hists.append(None)
                continue
            if step == "window":  # t is this call's own task vector (overwritten)
                lo, hi = state["window"][i]
                hists.append(abs_window_hist(t, lo, hi))
                continue
            k = keys(t.abs_(), nonneg=True)
            if step in ("sample", "high"):
                hists.append(high_hist(k, nonneg=True))
            else:
                hists.append(low_hist(k, state["bucket"][i][0]))
        return {"numel": base.numel(), "density": dens, "hist": hists, "name": ctx.name}

    def _fused_sample(self, base, models, dens, name, fns):
        """The ``sample`` step's high-key histograms of |tau_i| by the fused kernels (no sparsifier, or
        DARE's draw on the sample, which only estimates)."""
        hists = []
        if all(t.dtype == torch.bfloat16 for t in [base, *models]):  # one fused pass over the kernel threads
            for m, d, fn in zip(models, dens, fns):
                hists.append(_F.high_hist_bf16(m.reshape(-1), base.reshape(-1), None if fn is None else fn.draw)
                             if needs_selection(d) else None)
            return {"numel": base.numel(), "density": dens, "hist": hists, "name": name}
        b = _F.as_float32(base.reshape(-1))
        for m, d, fn in zip(models, dens, fns):
            if not needs_selection(d):
                hists.append(None)
                continue
            t = _F.sub(m.reshape(-1), b, slot=1)
            if fn is not None:
                fn(t, 0)
            hists.append(_F.abs_high_hist(t))
        return {"numel": base.numel(), "density": dens, "hist": hists, "name": name}

    def fold(self, pass_index, state, acc, part):
        """The ``window`` pass is summed as it streams (dense histograms of the window, a few MB per
        model) instead of holding every tensor's sparse histogram until ``reduce``."""
        if state["steps"][pass_index] != "window":
            return NotImplemented
        if part is None:
            return acc
        if acc is None:
            acc = {"numel": 0, "density": part["density"], "name": part["name"],
                   "hist": [None if h is None else [0, torch.zeros(hi - lo, dtype=torch.int64)]
                            for h, (lo, hi) in zip(part["hist"], [w or (0, 0) for w in state["window"]])]}
        if part["density"] != acc["density"]:
            raise MergeError(self._mixed(part["density"], part["name"], acc["density"]))
        acc["numel"] += part["numel"]
        for h, a in zip(part["hist"], acc["hist"]):
            if h is not None:
                a[0] += h[0]
                if h[1][0].numel():
                    a[1].index_add_(0, h[1][0], h[1][1])
        return acc

    # -- reduce ------------------------------------------------------------------------------------
    def reduce(self, pass_index, state, partials):
        state = dict(state)
        step = state["steps"][pass_index]
        parts = [x for x in partials if x is not None]
        if step == "major":
            total = sum(parts)
            state["major"] = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
            return state
        if not parts:
            return state
        dens = parts[0]["density"]
        for x in parts:
            if x["density"] != dens:
                raise MergeError(self._mixed(x["density"], x["name"], dens))
        n = len(dens)
        count = sum(x["numel"] for x in parts)
        want = [needs_selection(d) for d in dens]
        if step == "sample":
            state.update(density=dens, window=[_window(dense([x["hist"][i] for x in parts]), count, dens[i])
                                               if want[i] else None for i in range(n)])
        elif step == "window":
            thr, redo = [None] * n, []
            for i in range(n):
                if not want[i]:
                    continue
                r = official_rank(count, dens[i])
                below = sum(x["hist"][i][0] for x in parts)
                lo, hi = state["window"][i]
                inside = dense([x["hist"][i][1] for x in parts], hi - lo)
                if below < r <= below + int(inside.sum()):
                    thr[i] = bits_to_float(lo + locate(inside, r - below)[0])
                else:
                    redo.append(i)
            state.update(count=count, density=dens, thr=thr, redo=redo)
            if redo:  # the sample missed for these models: exact two-level selection over every element
                state["steps"] = state["steps"][: pass_index + 1] + ["high", "low"] + state["steps"][pass_index + 1:]
        elif step == "high":
            buckets = [None] * n
            for i in state["redo"]:
                buckets[i] = locate(dense([x["hist"][i] for x in parts]), official_rank(count, dens[i]))
            state.update(bucket=buckets)
        else:  # low
            thr = list(state["thr"])
            for i in state["redo"]:
                b, rest = state["bucket"][i]
                low, _ = locate(dense([x["hist"][i] for x in parts]), rest)
                thr[i] = key_value(b, low)
            state.update(thr=thr, redo=[])
        return state

    def check_plan(self, params) -> None:
        first = [float(d) for d in params[0][self.pipe.trim]] if self.pipe.trim else None
        for p in params:
            self.pipe.validate(p)
            if first is None:
                continue
            dens = [float(d) for d in p[self.pipe.trim]]
            if dens != first and any(needs_selection(d) for d in dens + first):
                raise MergeError(self._mixed(dens, "some tensor", first))

    def _mixed(self, got, name, first=None) -> str:
        first = f"{first} elsewhere, " if first is not None else ""
        return (f"{self.pipe.name}: scope global needs one '{self.pipe.trim}' per model for the whole model "
                f"({first}{got} at {name}); use scope: tensor for per-layer values")


def _window_blocks(base: torch.Tensor, models: list[torch.Tensor], fns: list, windows: list, step: int) -> list:
    """The window pass on the CPU block by block over the kernel threads: per block, each model's task
    vector is formed (and sparsified, ``fns``) in cache and only its window counts leave the block.
    ``windows[i]``: (lo, hi) keys, or None (no selection for model i)."""
    fb = base.reshape(-1)
    flat = [m.reshape(-1) for m in models]
    parts: dict[int, list] = {}

    # fused kernels: numpy views made once per tensor, sliced per block (torch slicing costs ~us under the GIL)
    if _F.enabled(fb.numel()):
        arrs, base_arr = [_F.host_array(m) for m in flat], _F.host_array(fb)
        drops = [_F.drop_args(None if fn is None else [fn.draw], 1) if in_kernel(fn) else None for fn in fns]

        def work(a: int, b: int) -> None:
            out = []
            bb = _F.float32_block(base_arr[a:b])
            for m, fn, w, drop in zip(arrs, fns, windows, drops):
                if w is None:
                    out.append(None)
                elif m.dtype == np.int16 and drop is not None:  # from the bits, DARE's draw in the kernel
                    out.append(_F.window_bf16(m[a:b], bb, *w, drop, start=a))
                else:
                    out.append(_F.window(tau_block(m[a:b], bb, fn, a, slot=1), *w))
            parts[a] = out
    else:
        def work(a: int, b: int) -> None:
            out = []
            bb = fb[a:b]
            for m, fn, w in zip(flat, fns, windows):
                if w is None:
                    out.append(None)
                    continue
                t = block_tau(m[a:b], bb, fn, a)
                out.append(window_part(t.abs_().numpy(), *w))
            parts[a] = out

    _S.run_blocks(fb.numel(), step, work)
    return [None if w is None else window_merge([parts[a][i] for a in sorted(parts)], *w)
            for i, w in enumerate(windows)]


def _window(hist, n: int, density: float) -> tuple[int, int]:
    """[lo_key, hi_key): high buckets around the sample's (1 - density) quantile, with a margin of
    8 binomial standard deviations plus 0.5 % of the ranks, at most MAX_WINDOW buckets wide."""
    q = 1.0 - density
    margin = 8.0 * math.sqrt(max(n * q * (1 - q), 1.0)) + 0.005 * n + 1
    mid = min(max(1, round(q * n)), n)
    b_lo = locate(hist, int(min(max(1, math.floor(q * n - margin)), n)))[0]
    b_hi = locate(hist, int(min(max(1, math.ceil(q * n + margin)), n)))[0]
    if b_hi - b_lo + 1 > MAX_WINDOW:  # keep the buckets nearest the estimate
        b_mid = locate(hist, mid)[0]
        b_lo = max(b_lo, b_mid - MAX_WINDOW // 2)
        b_hi = b_lo + MAX_WINDOW - 1
    return (b_lo - _OFFSET) << 16, (b_hi - _OFFSET + 1) << 16
