"""Python API: merge in memory, merge one tensor, run a recipe to a folder."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .methods.base import MergeError, Params, TensorContext, get_method
from .recipe import resolve_params, validate_param_names


def method_params(method: str, num_models: int, name: str = "tensor", t: float = 0.0, **params) -> Params:
    """Resolve ``params`` (scalars, per-model lists, gradients, filters) for one tensor of ``method``.

    A per-model parameter given as a list of length ``num_models`` is taken as one value per model;
    any other value applies to every model.
    """
    spec = get_method(method)
    validate_param_names(spec, params, "")
    glob: dict[str, Any] = {}
    per_model: list[dict] = [dict() for _ in range(num_models)]
    for k, v in params.items():
        p = spec.param(k)
        if p.scope == "model" and isinstance(v, (list, tuple)) and len(v) == num_models and not (
            v and all(isinstance(x, dict) for x in v)
        ):
            for i in range(num_models):
                per_model[i][k] = v[i]
        else:
            glob[k] = v
    return resolve_params(spec, name, t, [glob], [[d] for d in per_model])


def merge_tensors(
    method: str,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    name: str = "tensor",
    seed: int = 0,
    stats: Any = None,
    **params,
) -> torch.Tensor:
    """Merge one tensor with a registered method (float32 arithmetic, result in the input dtype).

    Methods with a whole-model statistics pass get it computed on this single tensor.
    """
    spec = get_method(method)
    _check_counts(spec, len(models), base is not None)
    p = method_params(method, len(models), name=name, **params)
    dtype = (base if base is not None else models[0]).dtype
    b = base.to(torch.float32) if base is not None else None
    ms = [m.to(torch.float32) for m in models]
    ctx = TensorContext(name=name, seed=seed, shape=tuple(ms[0].shape))
    if stats is None and spec.stats_for(p) is not None:
        gs = spec.stats_for(p)
        state = gs.init(p, len(ms))
        for k in range(gs.passes(p)):
            state = gs.reduce(k, state, [gs.collect(k, state, ctx, b, ms, p)])
        stats = state
    ctx.stats = stats
    return spec.fn(ctx, b, ms, p).to(dtype)


def _check_counts(spec, n: int, has_base: bool) -> None:
    if spec.base == "required" and not has_base:
        raise MergeError(f"method '{spec.name}' needs a base model (set base_model)")
    if n < spec.min_models:
        raise MergeError(f"method '{spec.name}' needs at least {spec.min_models} model(s) besides the base, got {n}")
    if spec.max_models is not None and n > spec.max_models:
        raise MergeError(f"method '{spec.name}' takes at most {spec.max_models} model(s) besides the base, got {n}")
