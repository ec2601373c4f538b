"""Python API: merge in memory, merge one tensor, run a recipe to a folder."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .methods.base import MergeError, Params, TensorContext, get_method
from .recipe import check_defaults, default_layer, resolve_params, validate_param_names


def method_params(method: str, num_models: int, name: str = "tensor", *, layer_t: float = 0.0,
                  defaults: str = "paper", **params) -> Params:
    """Resolve ``params`` (scalars, per-model lists, gradients, filters) for one tensor of ``method``.

    A per-model parameter given as a list of length ``num_models`` is taken as one value per model;
    any other value applies to every model. ``defaults="mergekit"``: the parameters not given take
    mergekit 0.1.5's settings (``MethodSpec.mergekit_params``) instead of the paper's defaults.
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
    return resolve_params(spec, name, layer_t, [glob, default_layer(spec, check_defaults(defaults))],
                          [[d] for d in per_model])


def merge_tensors(
    method: str,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    name: str = "tensor",
    seed: int = 0,
    stats: Any = None,
    defaults: str = "paper",
    **params,
) -> torch.Tensor:
    """Merge one tensor with a registered method (float32 arithmetic, result in the input dtype).

    Methods with a whole-model statistics pass get it computed on this single tensor.
    """
    spec = get_method(method)
    _check_counts(spec, len(models), base is not None)
    p = method_params(method, len(models), name=name, defaults=defaults, **params)
    dtype = (base if base is not None else models[0]).dtype
    b = base.to(torch.float32) if base is not None else None
    ms = [m.to(torch.float32) for m in models]
    ctx = TensorContext(name=name, seed=seed, shape=tuple(ms[0].shape))
    if stats is None:
        from .engine import run_statistics

        stats = run_statistics(spec, p, [(ctx, b, ms, p)], len(ms))
    ctx.stats = stats
    return spec.fn(ctx, b, ms, p).to(dtype)


def _check_counts(spec, n: int, has_base: bool) -> None:
    if spec.base == "required" and not has_base:
        raise MergeError(f"method '{spec.name}' needs a base model (set base_model)")
    if n < spec.min_models:
        raise MergeError(f"method '{spec.name}' needs at least {spec.min_models} model(s) besides the base, got {n}")
    if spec.max_models is not None and n > spec.max_models:
        raise MergeError(f"method '{spec.name}' takes at most {spec.max_models} model(s) besides the base, got {n}")


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module | str],
    base: Mapping[str, torch.Tensor] | torch.nn.Module | str | None = None,
    *,
    seed: int = 0,
    dtype: str | None = None,
    device: str = "cpu",
    embed_policy: str = "error",
    defaults: str = "paper",
    **params,
) -> dict[str, torch.Tensor]:
    """Merge in memory through the same planner and engine as a recipe.

    ``models``/``base``: state dicts, nn.Modules, or checkpoint paths. ``params``: the method's
    parameters; a per-model parameter given as a list with one entry per model is split across models,
    and any value may be a gradient list or filter list as in recipes; ``defaults="mergekit"`` gives the
    parameters not set mergekit 0.1.5's values. Returns the merged state dict.
    """
    from .engine import DictSink, execute
    from .io.checkpoint import open_checkpoint
    from .plan import Planner
    from .recipe import Recipe

    spec = get_method(method)
    if not models:
        raise MergeError("merge_state_dicts: give at least one model")
    objs: dict[str, Any] = {}

    def ref(obj, label):
        objs[label] = obj
        return label

    entries = []
    n = len(models)
    glob: dict[str, Any] = {}
    per_model: list[dict] = [dict() for _ in range(n)]
    validate_param_names(spec, params, "")
    for k, v in params.items():
        p = spec.param(k)
        if p.scope == "model" and isinstance(v, (list, tuple)) and len(v) == n and not (v and all(isinstance(x, dict) for x in v)):
            for i in range(n):
                per_model[i][k] = v[i]
        else:
            glob[k] = v
    for i, m in enumerate(models):
        entries.append({"model": ref(m, f"model_{i}") if not isinstance(m, str) else m, "parameters": per_model[i]})
    data: dict[str, Any] = {"merge_method": method, "models": entries, "parameters": glob, "random_seed": seed,
                            "embed_policy": embed_policy, "defaults": defaults}
    if base is not None:
        data["base_model"] = ref(base, "base") if not isinstance(base, str) else base
    if dtype is not None:
        data["dtype"] = dtype
    recipe = Recipe.model_validate(data)

    def opener(r):
        return open_checkpoint(objs[r], label=r) if r in objs else open_checkpoint(r)

    plan = Planner(recipe, opener=opener).build()
    sink = DictSink(plan)
    execute(plan, sink, device=device)
    return sink.tensors


def merge(recipe, out, **options):
    """Run a recipe (YAML path, YAML text, dict or Recipe) into the folder ``out``; see run.run_recipe."""
    from .run import run_recipe

    return run_recipe(recipe, out, **options)
