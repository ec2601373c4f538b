"""NearSwap: take the other model's value only where it is already close to the base.

alchemonaut, "NearSwap" (model card of alchemonaut/QuartetAnemoi-70B, 2024); mergekit `nearswap`.
No paper.

Per element, with base b and other model m:

    w = clamp(t / max(|b - m|, 1e-6), 0, 1),     theta = w * m + (1 - w) * b = b + w (m - b)

Where the models differ by at most t the other model is copied (w = 1); where they differ a lot the
base is kept. Typical t is tiny (e.g. 1e-4 for bf16 LLM weights). Tensors of two blocks or more run
block by block on the kernel threads from the stored bf16/float32 bits (``_fused.nearswap``: the float32
operations of the torch form below, bit for bit), writing bf16 output directly.
"""
from __future__ import annotations

from . import _fused as _F
from . import _gta as G
from .base import Param, register


@register(
    "nearswap",
    aliases=("near_swap",),
    paper="alchemonaut, NearSwap (model card of alchemonaut/QuartetAnemoi-70B, 2024); mergekit `nearswap`",
    math="w = clamp(t / max(|base - model|, 1e-6), 0, 1); theta = w * model + (1 - w) * base",
    base="required",
    granularity="element",
    params=(
        Param("t", float, required=True, help="similarity distance: differences <= t take the other model's value"),
    ),
    min_models=1,
    max_models=1,
    mergekit="identical to mergekit `nearswap`.",
    example={"t": 1e-3},
    raw_inputs=G.fused_shape,
)
def nearswap(ctx, base, models, p):
    if G.fused_inputs(base, models):
        t = p["t"]
        return G.kernel_blocks([base, models[0]], ctx.out_dtype, lambda xs, out: _F.nearswap(xs[1], xs[0], t, out))
    if ctx.raw:  # handed as stored (raw_inputs) but not for the kernel: float32 copies
        ctx, base, models = G.float32_inputs(ctx, base, models)
    diff = models[0] - base
    w = (p["t"] / diff.abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    return base + w * diff
