"""Task Arithmetic.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).

tau_i = theta_i - theta_0
theta = theta_0 + lambda * sum_i w_i tau_i            (normalize=False, default)
theta = theta_0 + lambda * sum_i w_i tau_i / sum_i w_i (normalize=True)

Negative weights give forgetting (task negation): theta_0 - lambda * tau.
The paper tunes lambda on validation; without validation 0.3 is the usual 8-task default. Our
default lambda=1 with weight 1 matches mergekit's `task_arithmetic`.
"""
from __future__ import annotations

from . import _gta as G
from .base import MergeError, Param, register

# the GTA pipeline without sparsifier, trim or election: delta = sum_i w_i tau_i [/ sum_i w_i], then
# theta_0 + lambda * delta (block by block, fused kernels reading the stored bf16 bits on the CPU)
_PIPE = G.Pipeline("task_arithmetic")


def _check_weights(p) -> None:
    """At planning, per tensor (a weight gradient may reach a zero sum at some layer only)."""
    if p["normalize"] and abs(sum(p["weight"])) < 1e-8:
        raise MergeError("task_arithmetic: the weights sum to 0 with normalize=true")


@register(
    "task_arithmetic",
    aliases=("ta", "task_vector"),
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
    math="theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0)  [/ sum_i w_i if normalize]",
    base="required",
    granularity="element",
    params=(
        Param("weight", float, 1.0, scope="model", help="per-model weight; negative = forgetting"),
        Param("lambda", float, 1.0, help="scaling of the summed task vector (paper: tuned, ~0.3 for 8 tasks)"),
        Param("normalize", bool, False, help="divide by the sum of weights"),
    ),
    raw_inputs=_PIPE.raw_inputs,
    mergekit="identical to mergekit `task_arithmetic` (density 1).",
    validate=_check_weights,
)
def task_arithmetic(ctx, base, models, p):
    _check_weights(p)
    return _PIPE.merge(ctx, base, models, p)
