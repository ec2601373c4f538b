"""LiNeS: Layer-increasing Network Scaling of (merged) task vectors.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025 (arXiv 2410.17146); code wang-kee/LiNeS.

tau      = the base merge's unscaled task vector (merge=task_arithmetic: sum_i tau_i; ties; consensus_ta;
           consensus_ties) — with one model it is tau_1 (single-task editing)
factor   s(l) = alpha + beta * l / (L - 1) for a tensor in block l of L; tensors outside the block stack
           (embeddings, final norm, heads) and L = 1 get alpha
theta    = theta_0 + s(l) * tau

alpha (default: automatic, the paper's multi-task rule) = (1/N) ||sum_i tau_i||_1 / ||tau||_1 over the
whole model: 1/N for task arithmetic (no statistics pass), a streamed L1 pass otherwise.
beta default: 0.5 with N >= 2 (the paper tunes beta on validation, 0.1..1.0; 0.5 is our unvalidated
default), and 1 - alpha with one model (the paper's single-task rule: the last block keeps its full
update). alpha = lambda, beta = 0 gives the base merge scaled by lambda (e.g. task arithmetic).

The block index comes from the engine (``ctx.layer``/``ctx.num_layers``, resolved from tensor names by
``mergesmith.layers.layer_index``); ``layer_pattern`` and ``num_layers`` override them.
"""
from __future__ import annotations

import dataclasses

import torch

from ..layers import layer_index
from .base import GlobalStats, MergeError, Param, Params, get_method, register
from . import _gta as G
from .consensus import CONSENSUS_PARAMS, consensus_ta_delta, consensus_ties_delta
from .kernels import task_vectors

_MERGES = ("task_arithmetic", "ties", "consensus_ta", "consensus_ties")
_DELTAS = {
    "task_arithmetic": lambda ctx, base, models, p: torch.stack(task_vectors(base, models)).sum(0),
    "consensus_ta": consensus_ta_delta,
    "consensus_ties": consensus_ties_delta,
}
_OWN = {"alpha", "beta", "merge", "num_layers", "layer_pattern"}


def inner_params(p, n: int) -> Params:
    """Parameters for the base merge: its defaults, overridden by the values LiNeS passes through,
    with the base merge's own scale fixed to 1 (LiNeS does the scaling)."""
    spec = get_method(p["merge"])
    out = Params()
    for q in spec.params:
        if q.name in p and q.name not in _OWN:
            out[q.name] = p[q.name]
        else:
            out[q.name] = [q.default] * n if q.scope == "model" else q.default
    if "lambda" in out:
        out["lambda"] = 1.0
    return out


def _chunkable(p, name: str = "", shape: tuple = ()) -> bool:
    """Row chunks give the whole tensor's result when they do for the base merge: the layer factor is one
    number per tensor (and alpha's L1 norms add up over chunks). Per-model values given in ``p`` pass
    through as they are; the model count only sizes the defaults, which are the same for every model."""
    return get_method(p["merge"]).can_chunk(inner_params(p, 1), name, shape)


def merged_delta(ctx, base, models, pin, merge: str) -> torch.Tensor:
    """The base merge's task vector; a merge that depends on tau_i only is run on (0, tau_i), which
    gives its delta exactly."""
    fn = _DELTAS.get(merge)
    if fn is not None:
        return fn(ctx, base, models, pin)
    return get_method(merge).fn(ctx, torch.zeros_like(base), [m - base for m in models], pin)


class LinesStats(GlobalStats):
    """The base merge's own statistics passes (if any), then one pass of the two L1 norms of alpha."""

    def __init__(self, merge: str):
        self.merge = merge
        self.inner = get_method(merge).stats

    def _inner(self, pin):
        s = self.inner
        return s(pin) if callable(s) and not isinstance(s, GlobalStats) else s

    def passes(self, params, state=None) -> int:
        return self._ni(params, state) + 1

    def _ni(self, params, state) -> int:
        """The base merge's own passes (their number may grow during the run, see GlobalStats)."""
        if state is not None:
            gs = state["gs"]
            return gs.passes(state["pin"], state["inner"]) if gs else 0
        inner = self._inner(inner_params(params, 1))
        return inner.passes(inner_params(params, 1)) if inner else 0

    def sample_stride(self, k, state) -> int:
        gs = state["gs"]
        return gs.sample_stride(k, state["inner"]) if gs and k < self._ni(None, state) else 0

    def init(self, params, num_models):
        pin = inner_params(params, num_models)
        inner = self._inner(pin)
        return {"inner": inner.init(pin, num_models) if inner else None, "gs": inner, "pin": pin, "l1": [0.0, 0.0]}

    def collect(self, k, state, ctx, base, models, p):
        pin = inner_params(p, len(models))
        ictx = dataclasses.replace(ctx, stats=state["inner"], owned=False)
        if k < self._ni(None, state):
            return state["gs"].collect(k, state["inner"], ictx, base, models, pin)
        total = torch.stack(task_vectors(base, models)).sum(0)
        merged = merged_delta(ictx, base, models, pin, p["merge"])
        return float(total.abs().sum(dtype=torch.float64)), float(merged.abs().sum(dtype=torch.float64))

    def reduce(self, k, state, partials):
        if k < self._ni(None, state):
            state["inner"] = state["gs"].reduce(k, state["inner"], partials)
            return state
        for a, b in partials:
            state["l1"][0] += a
            state["l1"][1] += b
        return state


def _stats(p):
    if p.get("alpha") is None and p.get("merge", "task_arithmetic") != "task_arithmetic":
        return LinesStats(p["merge"])
    inner = get_method(p.get("merge", "task_arithmetic")).stats
    if inner is None:
        return None
    return _InnerOnly(p["merge"])


class _InnerOnly(LinesStats):
    """alpha given: only the base merge's own statistics."""

    def passes(self, params, state=None) -> int:
        return super().passes(params, state) - 1


def _alpha(p, n: int, stats) -> float:
    if p["alpha"] is not None:
        return p["alpha"]
    if p["merge"] == "task_arithmetic":
        return 1.0 / n
    total, merged = stats["l1"]
    return (total / merged) / n if merged > 0 else 1.0 / n


def _layer(ctx, p) -> tuple[int | None, int | None]:
    if p["layer_pattern"]:
        layer = layer_index(ctx.name, p["layer_pattern"])
    elif ctx.num_layers is not None:
        layer = ctx.layer
    else:  # not run by the engine (e.g. merge_tensors): resolve from the name
        layer = layer_index(ctx.name)
    return layer, (p["num_layers"] or ctx.num_layers)


def lines_factor(layer: int | None, num_layers: int | None, alpha: float, beta: float) -> float:
    """alpha + beta * l / (L - 1); alpha outside the block stack or for L <= 1."""
    if layer is None or num_layers is None or num_layers <= 1:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


@register(
    "lines",
    aliases=("layer_scaling", "lines_merging"),
    paper="Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging, ICLR 2025 (arXiv 2410.17146)",
    math=(
        "theta = theta_0 + (alpha + beta * l/(L-1)) * tau_merge   (alpha outside the block stack)\n"
        "alpha auto = (1/N) ||sum_i tau_i||_1 / ||tau_merge||_1;  beta = 0.5 (N >= 2) or 1 - alpha (N = 1)"
    ),
    base="required",
    granularity="block",
    params=(
        Param("alpha", float, None, help="scale of the first block and of tensors outside the stack; default automatic"),
        Param("beta", float, None, help="extra scale reached at the last block; default 0.5 (N>=2) or 1-alpha (N=1)"),
        Param("merge", str, "task_arithmetic", choices=_MERGES, help="base merge whose task vector is scaled"),
        Param("num_layers", int, None, help="number of blocks L (default: from the model)"),
        Param("layer_pattern", str, None, help="regex with one group = block index (default: engine's resolver)"),
        G.density_param(0.2, "merge=ties/consensus_ties: fraction of |tau_i| kept by the TIES trim"),
        G.trim_params("global")[0],
    ) + tuple(q for q in CONSENSUS_PARAMS if q.name != "lambda"),
    stats=_stats,
    chunkable=_chunkable,
    mergekit="not in mergekit; close to a task_arithmetic recipe with a per-layer weight gradient [alpha, alpha+beta].",
    example={"beta": 0.5},
)
def lines(ctx, base, models, p):
    n = len(models)
    layer, L = _layer(ctx, p)
    if layer is not None and L is None:
        raise MergeError(f"lines: {ctx.name} is in block {layer} but the number of blocks is unknown; set num_layers")
    pin = inner_params(p, n)
    stats = ctx.stats
    ictx = dataclasses.replace(ctx, stats=stats["inner"] if stats else None, owned=False)
    tau = merged_delta(ictx, base, models, pin, p["merge"])
    alpha = _alpha(p, n, stats)
    beta = p["beta"] if p["beta"] is not None else (0.5 if n >= 2 else 1.0 - alpha)
    return base + lines_factor(layer, L, alpha, beta) * tau
