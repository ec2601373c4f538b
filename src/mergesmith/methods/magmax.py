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
    return base + p["lambda"] * max_magnitude(task_vectors(base, models))


def max_magnitude(taus: list[torch.Tensor]) -> torch.Tensor:
    """Per coordinate the entry of largest |tau_i|, the first model winning exact ties and NaN counting as
    the largest (``torch.argmax`` of the stacked magnitudes, then a gather; the same values), by one running
    comparison per model: torch's argmax over a short leading dimension was ~15x slower."""
    best = taus[0].clone()
    top = best.abs()
    for t in taus[1:]:
        a = t.abs()
        take = (a > top) | (a.isnan() & ~top.isnan())
        best = torch.where(take, t, best)
        top = torch.where(take, a, top)
    return best
