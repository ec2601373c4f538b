"""RAM: Reinforced Agent Merging (average shared updates, keep unique ones), and RAM+ (rescale them).

Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (arXiv 2601.13572, 2026); the
authors' code xiangchi-yuan/mrl (``ram-main.py``); mergekit 0.1.5 ``ram`` and ``ramplus_tl``.

RL fine-tuning changes few parameters, and different tasks change different ones; plain averaging
divides a change only one model made by the number of models. With tau_i = theta_i - theta_0 and
m_i = [|tau_i| > epsilon] ("changed"), c = sum_i m_i (how many models changed the element):

    ram:      theta = theta_0 + sum_i m_i tau_i / max(c, 1)
              (unique changes, c = 1, are kept whole; shared ones, c > 1, averaged over their models)
    ramplus:  unique changes of model i are also scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
              rho_i = shared_i / unique_i, where shared_i counts the elements model i changed that
              another model changed too, and unique_i those only model i changed (whole model)
    ramplus_tl: the same with shared_i and unique_i counted per tensor (mergekit's "tensor-local"
              variant; unique_i = 0 counts as epsilon there)

Elements no model changed keep theta_0 (so an element changed by less than epsilon is reset). The
official code's RAM+ ("arm-r-v2") is lambda_i = 1 + (R - 1) min(1, rho_i), rho_i over the whole
model, with R = 1.2 in its README's RAM+ command: ``ramplus`` here with r = R - 1 = 0.2, alpha = 1
(its defaults). We could not read the paper's own equation; mergekit's ``ramplus_tl`` writes the same
form with r 0.1, alpha 0.2 (its defaults, kept). A model whose changes are all shared (unique_i = 0)
gets lambda_i = 1 + r * alpha, one that changed nothing 1 (neither has a unique change to scale; the official
code divides by zero there).
Shared elements are averaged as the mean of the changes (sum, then divide by c, as the official code);
mergekit divides each change by c before summing (the same value to float rounding).
"""
from __future__ import annotations

import torch

from . import _fused as _F
from . import _gta as G
from .base import GlobalStats, MergeError, Param, register
from .kernels import task_vectors


def changes(base: torch.Tensor, models: list[torch.Tensor], epsilon: float):
    """(tau_i, m_i = |tau_i| > epsilon, c = sum_i m_i as int32)."""
    taus = task_vectors(base, models)
    masks = [t.abs() > epsilon for t in taus]
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for m in masks:
        count += m
    return taus, masks, count


def overlap_counts(masks: list[torch.Tensor], count: torch.Tensor) -> torch.Tensor:
    """int64 [N, 2]: per model, (shared_i, unique_i) = elements it changed that c > 1 / c == 1."""
    shared, unique = count > 1, count == 1
    return torch.stack([torch.stack([(m & shared).sum(), (m & unique).sum()]) for m in masks]).to(torch.int64).cpu()


def counts_of(ctx, base, models, epsilon: float) -> torch.Tensor:
    """:func:`overlap_counts` of these inputs: by the block kernel (``_fused.ram_counts``, inputs as stored),
    else in torch."""
    if G.fused_inputs(base, models):
        kernel = lambda xs, acc: _F.ram_counts(xs[1:], xs[0], epsilon, acc)  # noqa: E731
        return torch.from_numpy(G.kernel_sums([base, *models], (len(models), 2), kernel))
    if ctx.raw:
        ctx, base, models = G.float32_inputs(ctx, base, models)
    _, masks, count = changes(base, models, epsilon)
    return overlap_counts(masks, count)


def merge(ctx, base, models, epsilon: float, scales=None) -> torch.Tensor:
    """RAM (``scales`` None) or RAM+ with these float32 scales of the unique changes: by the block kernel
    (``_fused.ram``: the float32 operations of :func:`ram_combine`, inputs as stored), else in torch."""
    if G.fused_inputs(base, models):
        sc = None if scales is None else scales.cpu().numpy()
        kernel = lambda xs, out: _F.ram(xs[1:], xs[0], epsilon, sc, out)  # noqa: E731
        return G.kernel_blocks([base, *models], ctx.out_dtype, kernel)
    if ctx.raw:
        ctx, base, models = G.float32_inputs(ctx, base, models)
    taus, masks, count = changes(base, models, epsilon)
    return ram_combine(base, taus, masks, count, None if scales is None else scales.to(base.device))


def ram_combine(base, taus, masks, count, scales=None) -> torch.Tensor:
    """theta_0 + the unique changes (times ``scales[i]``, a float32 per model, if given) + the mean of
    the shared ones."""
    changed = torch.zeros_like(base)  # the sum of the changes: the mean of the shared ones is changed / c
    unique = torch.zeros_like(base)
    for i, (t, m) in enumerate(zip(taus, masks)):
        tm = torch.where(m, t, 0.0)  # not t * m: an unchanged NaN would spread
        changed += tm
        if scales is not None:
            unique += tm * scales[i]
    divisor = count.clamp(min=1).to(base.dtype)
    if scales is None:  # c = 1: the sum is the one change itself
        return base + changed / divisor
    return base + torch.where(count == 1, unique, changed / divisor)


def _validate(p) -> None:
    if p["epsilon"] < 0:
        raise MergeError(f"ram: epsilon must be >= 0, got {p['epsilon']}")
    if "r" in p and p["alpha"] < 0:
        raise MergeError(f"ramplus: alpha must be >= 0, got {p['alpha']}")


EPSILON = Param("epsilon", float, 1e-5, help="a change |tau_i| <= epsilon counts as unchanged")
PLUS_MATH = "ram, with the unique changes of model i scaled by lambda_i = 1 + r clamp(shared_i / unique_i, 0, alpha), "


def plus_params(r: float, alpha: float, r_help: str = "rescale strength") -> tuple[Param, ...]:
    """RAM+'s parameters with these defaults."""
    return (Param("r", float, r, help=r_help), Param("alpha", float, alpha, help="cap on the overlap ratio rho_i"),
            EPSILON)


@register(
    "ram",
    aliases=("reinforced_agent_merging",),
    paper="Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (arXiv 2601.13572), RAM",
    math="m_i = [|tau_i| > eps], c = sum_i m_i; theta = theta_0 + sum_i m_i tau_i / max(c, 1)",
    base="required",
    granularity="element",
    params=(EPSILON,),
    min_models=1,
    mergekit="mergekit `ram` (same parameters; it divides each change by c before summing: float rounding).",
    notes="for sparse (RL-trained) task vectors; with dense ones it is the average of the task vectors.",
    example={"epsilon": 0.01},
    validate=_validate,
    raw_inputs=G.fused_shape,
)
def ram(ctx, base, models, p):
    return merge(ctx, base, models, p["epsilon"])


def rescales(counts: torch.Tensor, r: float, alpha: float, dtype=torch.float64) -> torch.Tensor:
    """lambda_i = 1 + r clamp(shared_i / unique_i, 0, alpha) from int64 counts [N, 2], computed in ``dtype``;
    unique_i = 0 gives rho_i = alpha if shared_i > 0 (mergekit: shared_i / epsilon), else 0 (never 0 / 0)."""
    shared, unique = counts[:, 0].to(dtype), counts[:, 1].to(dtype)
    rho = torch.where(unique > 0, shared / unique.clamp(min=1), torch.where(shared > 0, float(alpha), 0.0))
    return 1 + r * rho.clamp(0, alpha)


# -- ramplus_tl: the counts per tensor (summed over the engine's row chunks of a big tensor) -----------

def _tl_sums(ctx, base, models, p):
    return counts_of(ctx, base, models, p["epsilon"])


def _tl_scales(counts: torch.Tensor, p) -> torch.Tensor:
    # float32, as mergekit computes rho and lambda (int counts / a float32-clamped divisor)
    return rescales(counts, p["r"], p["alpha"], torch.float32)


@register(
    "ramplus_tl",
    aliases=("ram_plus_tl",),
    paper="Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (arXiv 2601.13572), RAM+ "
    "with the overlap ratio per tensor (mergekit's tensor-local variant)",
    math=PLUS_MATH + "counted in this tensor",
    base="required",
    granularity="tensor",
    params=plus_params(0.1, 0.2),
    min_models=1,
    mergekit="identical to mergekit `ramplus_tl` (same parameters and defaults).",
    example={"epsilon": 0.01, "r": 0.5, "alpha": 1.0},
    validate=_validate,
    sums=_tl_sums,
    raw_inputs=G.fused_shape,
)
def ramplus_tl(ctx, base, models, p):
    counts = ctx.sums if ctx.sums is not None else counts_of(ctx, base, models, p["epsilon"])
    return merge(ctx, base, models, p["epsilon"], _tl_scales(counts, p))


# -- ramplus: the counts over the whole model (one statistics pass) ------------------------------------

class RamStats(GlobalStats):
    """One pass: per model, the elements it changed that another model changed too, and those it alone
    changed, over every tensor the method merges; then lambda_i."""

    def init(self, params, num_models):
        return {"counts": torch.zeros(num_models, 2, dtype=torch.int64), "scales": None}

    def collect(self, k, state, ctx, base, models, p):
        return counts_of(ctx, base, models, p["epsilon"])

    def fold(self, k, state, acc, part):
        return part if acc is None else acc + part

    def reduce(self, k, state, partials):
        counts = state["counts"] + sum((x for x in partials if x is not None), torch.zeros_like(state["counts"]))
        return {"counts": counts, "scales": None}


def _global_scales(ctx, p) -> torch.Tensor:
    if ctx.stats is None or ctx.stats.get("counts") is None:
        raise MergeError("ramplus: needs the whole-model statistics pass (run through the engine or merge_state_dicts)")
    lam = rescales(ctx.stats["counts"], p["r"], p["alpha"])  # float64, as the official code
    return lam.to(torch.float32)


_STATS = RamStats()


@register(
    "ramplus",
    aliases=("ram_plus", "ram+"),
    paper="Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (arXiv 2601.13572), RAM+; "
    "official code xiangchi-yuan/mrl (arm-r-v2)",
    math=PLUS_MATH + "counted over the whole model",
    base="required",
    granularity="global",
    params=plus_params(0.2, 1.0, "rescale strength (the official code's rescale_factor - 1)"),
    min_models=1,
    stats=_STATS,
    chunkable=True,
    mergekit="not in mergekit (its `ramplus_tl` counts per tensor).",
    example={"epsilon": 0.01},
    validate=_validate,
    raw_inputs=G.fused_shape,
)
def ramplus(ctx, base, models, p):
    return merge(ctx, base, models, p["epsilon"], _global_scales(ctx, p))
