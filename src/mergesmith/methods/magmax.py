"""MagMax: per coordinate, keep the task-vector entry of largest magnitude.

Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024
(arXiv 2407.06322).

tau_i = theta_i - theta_0
tau[p] = tau_{i*}[p],  i* = argmax_i |tau_i[p]|   (first model wins exact ties; its sign is kept)
theta  = theta_0 + lambda * tau

The paper applies it to sequentially fine-tuned checkpoints (each task starts from the previous
one); with independent fine-tunes it is an element-wise max-magnitude merge. lambda = 0.5 is the
paper's / FusionBench's default.
"""
from __future__ import annotations

import torch

from .base import Param, register
from .kernels import task_vectors


@register(
    "magmax",
    aliases=("mag_max", "max_magnitude"),
    paper="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024 (arXiv 2407.06322)",
    math="theta = theta_0 + lambda * tau_{i*},  i* = argmax_i |theta_i - theta_0|  (per coordinate)",
    base="required",
    granularity="element",
    params=(Param("lambda", float, 0.5, help="scale of the selected task vector"),),
    mergekit="not in mergekit.",
    example={"lambda": 0.5},
)
def magmax(ctx, base, models, p):
    d = torch.stack(task_vectors(base, models))
    idx = d.abs().argmax(dim=0, keepdim=True)
    return base + p["lambda"] * d.gather(0, idx).squeeze(0)
