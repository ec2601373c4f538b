"""Passthrough: copy one model's tensor, optionally scaled (frankenmerges / layer stacking).

Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models", 2024
(arXiv 2403.13257), method `passthrough` with `slices`; depth up-scaling as in SOLAR 10.7B
(Kim et al., arXiv 2312.15166).

theta = scale * theta_1   (exactly one input model, no base; ``scale`` defaults to 1 = plain copy)

The engine uses it for every tensor of a slice-assembled model; ``scale`` may be filtered per tensor
name, e.g. ``scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]`` to damp repeated layers.
Inputs come as stored (``raw_inputs``): a plain copy never goes through float32; a scale is applied in
float32 (then cast to the output dtype, as before).
"""
from __future__ import annotations

import torch

from .base import MergeError, Param, register


@register(
    "passthrough",
    aliases=("frankenmerge",),
    paper="Goddard et al., Arcee's MergeKit, 2024 (arXiv 2403.13257), `passthrough` slices",
    math="theta = scale * theta_1",
    base="none",
    granularity="element",
    params=(Param("scale", float, 1.0, scope="model", help="multiplier of the copied tensor"),),
    min_models=1,
    max_models=1,
    mergekit="identical to mergekit `passthrough` (scale unset = 1).",
    notes="exactly one input per tensor; use `slices:` to stack layer ranges of several models.",
    example={},
    raw_inputs=lambda p, shape: True,
)
def passthrough(ctx, base, models, p):
    if base is not None:
        raise MergeError("passthrough takes exactly one input model and no base model; remove base_model")
    scale = p["scale"][0]
    return models[0].clone() if scale == 1.0 else models[0].to(torch.float32) * scale
