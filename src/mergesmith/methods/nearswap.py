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

import math

import torch

from ..io import buffers
from . import _fused as _F
from . import _gta as G
from . import _sampling as _S
from .base import Param, register


def _blocks(base: torch.Tensor, model: torch.Tensor, t: float, out_dtype) -> torch.Tensor:
    narrow = out_dtype == torch.bfloat16
    out = buffers.empty(base.shape, torch.bfloat16 if narrow else torch.float32)
    fo, fb, fm = out.view(-1), base.reshape(-1), model.reshape(-1)

    def block(a: int, b: int) -> None:
        o = _F.scratch(-5, b - a) if narrow else fo[a:b]
        _F.nearswap(_F.as_float32(fm[a:b], slot=1), _F.as_float32(fb[a:b], slot=0), t, o)
        if narrow:
            _F.narrow_bf16(o, fo[a:b])

    _S.run_blocks(fb.numel(), _S.BLOCK, block)
    return out


def _raw_ok(p, shape) -> bool:
    return G.fused_size(math.prod(shape))


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
    raw_inputs=_raw_ok,
)
def nearswap(ctx, base, models, p):
    if G.fused_inputs(base, models):
        return _blocks(base, models[0], p["t"], ctx.out_dtype)
    if ctx.raw:  # handed as stored (raw_inputs) but not for the kernel: float32 copies
        ctx, base, models = G.float32_inputs(ctx, base, models)
    diff = models[0] - base
    w = (p["t"] / diff.abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    return base + w * diff
