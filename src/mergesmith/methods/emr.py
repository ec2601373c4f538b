"""EMR-Merging: Elect, Mask & Rescale (tuning-free, task-conditioned).

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024 (arXiv
2405.17461); official code harveyhuang18/EMR_Merging.

tau_i   = theta_i - theta_0
elect   gamma = sgn+(sum_i tau_i)  (+1 if > 0 else -1);  eps = max_i |tau_i| [tau_i * gamma > 0]
        tau_uni = gamma * eps
mask    M_i = [tau_i * tau_uni > 0]
rescale lambda_i = sum |tau_i| / sum |M_i * tau_uni|      (sums over the whole model: the paper)
task i  theta_i ~ theta_0 + lambda_i * M_i * tau_uni

The result is task-conditioned: one unified task vector plus one bit per parameter and one scalar per
task. The registered tensor method ``emr`` returns the unified model theta_0 + tau_uni (task=-1) or
task i's model (task=i; lambda_i comes from a whole-model statistics pass). The compact artefact with
bit-packed masks is written by ``mergesmith compress --method emr`` (mergesmith.compress).

rescale=paper (default) uses whole-model L1 sums as in the paper; rescale=code reproduces the
official code, which sums per-tensor *means* of |.| (every tensor weighs the same regardless of size).
An empty mask gives lambda_i = 1 (its value is then irrelevant). With one model, tau_uni = tau_1,
M_1 = [tau_1 != 0] and lambda_1 = 1, so the result is theta_0 + tau_1.
"""
from __future__ import annotations

import torch

from .base import GlobalStats, MergeError, Param, register
from .kernels import task_vectors


def emr_elect(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_uni, masks [N, ...] bool) from stacked task vectors d [N, ...]."""
    gamma = torch.where(d.sum(0) > 0, 1.0, -1.0).to(d.dtype)
    agree = d * gamma > 0
    eps = (d.abs() * agree).amax(0) if d.numel() else torch.zeros_like(d[0])
    return gamma * eps, agree


def emr_rescale_terms(d: torch.Tensor, tau_uni: torch.Tensor, masks: torch.Tensor, mode: str) -> tuple[list, list]:
    """This tensor's contribution to the numerator and denominator of every lambda_i."""
    n = d.shape[0]
    if d[0].numel() == 0:
        return [0.0] * n, [0.0] * n
    num = d.abs().reshape(n, -1)
    den = (masks * tau_uni).abs().reshape(n, -1)
    if mode == "code":
        return num.mean(1).tolist(), den.mean(1).tolist()
    return num.sum(1, dtype=torch.float64).tolist(), den.sum(1, dtype=torch.float64).tolist()


def emr_scales(num: list, den: list) -> list[float]:
    return [float(a / b) if b > 0 else 1.0 for a, b in zip(num, den)]


class EMRStats(GlobalStats):
    """One pass: per-task L1 sums (or per-tensor means) of tau_i and M_i * tau_uni."""

    def init(self, params, num_models):
        _check_task(params["task"], num_models)
        return {"num": [0.0] * num_models, "den": [0.0] * num_models}

    def collect(self, k, state, ctx, base, models, p):
        d = torch.stack(task_vectors(base, models))
        tau, masks = emr_elect(d)
        return emr_rescale_terms(d, tau, masks, p["rescale"])

    def reduce(self, k, state, partials):
        for num, den in partials:
            state["num"] = [a + b for a, b in zip(state["num"], num)]
            state["den"] = [a + b for a, b in zip(state["den"], den)]
        state["scales"] = emr_scales(state["num"], state["den"])
        return state


def _check_task(task: int, n: int) -> None:
    if task is not None and not -1 <= task < n:
        raise MergeError(f"emr: task must be -1 (unified model) or a model index 0..{n - 1}, got {task}")


_STATS = EMRStats()


@register(
    "emr",
    aliases=("emr_merging", "emr-merging"),
    paper="Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024 (arXiv 2405.17461)",
    math=(
        "gamma = sgn+(sum_i tau_i); tau_uni = gamma * max_i |tau_i|[tau_i gamma > 0]\n"
        "task=-1: theta = theta_0 + tau_uni;  task=i: theta = theta_0 + lambda_i M_i tau_uni,\n"
        "M_i = [tau_i tau_uni > 0], lambda_i = sum|tau_i| / sum|M_i tau_uni| (whole model)"
    ),
    base="required",
    granularity="element",
    params=(
        Param("task", int, -1, help="-1: the unified model; i: task i's masked and rescaled model"),
        Param("rescale", str, "paper", choices=("paper", "code"),
              help="lambda_i from whole-model L1 sums (paper) or sums of per-tensor means (official code)"),
    ),
    stats=lambda p: _STATS if p.get("task", -1) is not None and p.get("task", -1) >= 0 else None,
    chunkable=True,
    mergekit="not in mergekit. The task-conditioned artefact (masks + rescalers) comes from `mergesmith compress --method emr`.",
    example={},
)
def emr(ctx, base, models, p):
    _check_task(p["task"], len(models))
    d = torch.stack(task_vectors(base, models))
    tau, masks = emr_elect(d)
    if p["task"] < 0:
        return base + tau
    if ctx.stats is None or "scales" not in ctx.stats:
        raise MergeError("emr: task>=0 needs the statistics pass (run through the engine or merge_tensors)")
    i = p["task"]
    return base + ctx.stats["scales"][i] * (masks[i] * tau)
