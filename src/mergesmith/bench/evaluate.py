"""Scoring merged models on a zoo: per-task metric, average, and the score normalized to the experts.

Normalization (per task t, then averaged over tasks):

* accuracy (higher is better): ``acc(merged)_t / acc(expert_t)_t``, the "normalized accuracy" of
  Ilharco et al. (ICLR 2023) and the TALL/TSV papers;
* loss (lower is better): ``(L(base)_t - L(merged)_t) / (L(base)_t - L(expert_t)_t)``, the fraction of
  the expert's improvement over the base that the merge keeps (1 = expert, 0 = base).
"""
from __future__ import annotations

import time
from typing import Any

from .zoo import Zoo


def normalized(higher_is_better: bool, value: float, base: float, expert: float) -> float:
    if higher_is_better:
        return value / expert if expert else float("nan")
    gain = base - expert
    return (base - value) / gain if abs(gain) > 1e-12 else float("nan")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def score(zoo: Zoo, refs: dict, scores: dict[str, float]) -> dict[str, Any]:
    """Add average, per-task normalized scores and their average to raw per-task ``scores``."""
    hib = zoo.family.higher_is_better
    norm = {t: normalized(hib, scores[t], refs["base"][t], refs["experts"][t]) for t in zoo.tasks}
    return {"scores": scores, "average": mean(scores.values()), "normalized": norm,
            "normalized_average": mean(norm.values())}


def reference_scores(zoo: Zoo) -> dict[str, Any]:
    """Base, multi-task and every expert on every task; ``experts`` = each expert on its own task."""
    started = time.time()
    base = zoo.evaluate(zoo.state_dict("base"))
    matrix = {t: zoo.evaluate(zoo.state_dict(t)) for t in zoo.tasks}
    multitask = zoo.evaluate(zoo.state_dict("multitask"))
    n_models = len(zoo.tasks) + 2
    return {"base": base, "multitask": multitask, "expert_matrix": matrix,
            "experts": {t: matrix[t][t] for t in zoo.tasks},
            "eval_seconds_per_model": (time.time() - started) / n_models}


def quality_checks(zoo: Zoo, refs: dict, runs: list[dict]) -> dict[str, Any]:
    """The zoo's signal properties: experts beat the base on their own task, merges land between."""
    hib = zoo.family.higher_is_better
    better = (lambda a, b: a > b) if hib else (lambda a, b: a < b)
    expert_beats_base = {t: better(refs["experts"][t], refs["base"][t]) for t in zoo.tasks}
    base_norm = mean(normalized(hib, refs["base"][t], refs["base"][t], refs["experts"][t]) for t in zoo.tasks)
    between = {}
    for r in runs:
        if r.get("status") == "ok":
            between[r["label"]] = base_norm < r["normalized_average"] < 1.0
    return {"expert_beats_base": expert_beats_base, "base_normalized_average": base_norm,
            "merge_between_base_and_experts": between}
