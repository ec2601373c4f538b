"""Whole-model statistics for ``scope: global`` TIES trimming (exact, streaming).

The official TIES code flattens each task vector over the whole model and keeps
``|tau_i| >= t_i`` with ``t_i`` the ``(P - floor(k_i P))``-th smallest ``|tau_i|`` (P = number of
merged parameters). We find every ``t_i`` exactly without holding a task vector:

* pass ``high``: per model, a histogram of the high 16 bits of the float32 bit pattern of ``|tau_i|``
  (for non-negative IEEE-754 floats the bit pattern's integer order is the value order), plus the
  element count P. The bucket holding rank ``P - floor(k_i P)`` follows from the cumulative counts.
* pass ``low``: per model, a histogram of the low 16 bits of the entries inside that bucket, which
  pins the rank to one exact bit pattern, i.e. exactly ``torch.kthvalue`` of the concatenated vector.
* pass ``major`` (when ``zero_sign: majority``): the official fallback for coordinates whose elected
  sign is 0 is the *global* majority sign ``sgn(sum_p gamma_p)`` over the whole trimmed model, so the
  signed count of elected signs is summed over every tensor.

The histogram helpers are in ``_radix`` (tensor scope uses the same selection in memory, so a
one-tensor model gives bit-identical thresholds in both scopes). Partials are sparse histograms
(non-zero buckets only) or one integer per tensor; the state is a few numbers per model. Sparsifiers before the trim (DARE in ``dare_ties``) are recomputed identically in
every pass from ``ctx.generator``.
"""
from __future__ import annotations

from ._gta import needs_selection, official_rank
from ._radix import dense, high_hist, key_value, keys, locate, low_hist
from .base import GlobalStats, MergeError, Params


class GTAStats(GlobalStats):
    """Global trim thresholds and majority sign for a :class:`~._gta.Pipeline`."""

    def __init__(self, pipe):
        self.pipe = pipe

    def passes(self, params: Params) -> int:
        return len(self.pipe.stat_steps(params))

    def init(self, params: Params, num_models: int):
        self.pipe.validate(params)
        return {"method": self.pipe.name, "steps": self.pipe.stat_steps(params), "count": 0, "density": None,
                "bucket": None, "thr": None, "major": None}

    # -- collect -----------------------------------------------------------------------------------
    def collect(self, pass_index, state, ctx, base, models, p):
        step = state["steps"][pass_index]
        if base.numel() == 0:
            return None
        dens = [float(d) for d in p[self.pipe.trim]]
        if step == "major":
            if any(needs_selection(d) for d in dens) and (state["thr"] is None or dens != state["density"]):
                raise MergeError(self._mixed(dens, ctx.name))
            taus = self.pipe.deltas(ctx, base, models, p, thresholds=state["thr"])
            _, _, sign = self.pipe.elect(taus, p)
            return int((sign > 0).sum().item()) - int((sign < 0).sum().item())
        taus = self.pipe.deltas(ctx, base, models, p, trim=False)
        hists = []
        for i, t in enumerate(taus):
            if not needs_selection(dens[i]):
                hists.append(None)
                continue
            k = keys(t.abs(), nonneg=True)
            hists.append(high_hist(k, nonneg=True) if step == "high" else low_hist(k, state["bucket"][i][0]))
        return {"numel": base.numel(), "density": dens, "hist": hists, "name": ctx.name}

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
        if step == "high":
            count = sum(x["numel"] for x in parts)
            buckets = [None] * n
            for i in range(n):
                if needs_selection(dens[i]):
                    r = official_rank(count, dens[i])
                    buckets[i] = locate(dense([x["hist"][i] for x in parts]), r)
            state.update(count=count, density=dens, bucket=buckets)
            return state
        thr = [None] * n
        for i in range(n):
            if needs_selection(dens[i]):
                b, rest = state["bucket"][i]
                low, _ = locate(dense([x["hist"][i] for x in parts]), rest)
                thr[i] = key_value(b, low)
        state["thr"] = thr
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
