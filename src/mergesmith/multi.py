"""Multi-stage recipes (mergekit-multi's format): one YAML file with several documents (``---``), each a recipe
with a ``name``; a stage's name used as a model reference in a later stage (``name``, ``name@rev``,
``name+lora``) stands for that stage's output. The unnamed document (or else the last one) is the final
merge, written to the output folder; the named stages go to ``<stages>/<name>`` (default: ``<out>-stages``
beside the output) and are kept: a stage whose folder already holds a model is not merged again, as
mergekit-multi's default ``--lazy``.

Every document is validated before the first stage runs: schema, method, parameter names, unique names, no
cycle, and the whole plan of the stages that use no other stage (headers only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .methods.base import MergeError
from .recipe import load_recipe


def documents(text: str) -> list[dict] | None:
    """The recipe documents of ``text``, or None when it holds a single document (a plain recipe)."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise MergeError(f"recipe is not valid YAML: {str(e).splitlines()[0]}") from None
    if len(docs) <= 1:
        return None
    if not all(isinstance(d, dict) for d in docs):
        raise MergeError("every document of a multi-stage recipe must be a mapping (a recipe with a `name`)")
    return docs


def _uses(value: Any, name: str) -> bool:
    return isinstance(value, str) and (value == name or value.startswith((name + "@", name + "+")))


def _substitute(value: Any, paths: dict[str, str]) -> Any:
    """``value`` with every model reference to a stage replaced by that stage's folder."""
    if isinstance(value, dict):
        return {k: _substitute(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, paths) for v in value]
    for name, path in paths.items():
        if _uses(value, name):
            return path + value[len(name):]
    return value


def _refs(value: Any, names: set[str]) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_refs(v, names) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_refs(v, names) for v in value)) if value else set()
    return {n for n in names if _uses(value, n)}


def stages(docs: list[dict], out: Path, stages_dir: Path | None = None) -> list[tuple[str, dict, Path]]:
    """(name, recipe with stage references replaced by folders, output folder) in an order that builds every
    stage before the stages that use it; the final merge last."""
    named = [d for d in docs if d.get("name") is not None]
    unnamed = [d for d in docs if d.get("name") is None]
    if len(unnamed) > 1:
        raise MergeError("a multi-stage recipe has at most one unnamed document (the final merge)")
    names = [str(d["name"]) for d in named]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MergeError(f"stage name '{sorted(dup)[0]}' is used twice")
    final = unnamed[0] if unnamed else named[-1]
    final_name = None if unnamed else str(final["name"])
    stages_dir = Path(stages_dir) if stages_dir is not None else out.parent / f"{out.name}-stages"
    folders = {n: str((stages_dir / n).resolve()) for n in names}
    if final_name is not None:
        folders[final_name] = str(out)
    bodies = {}
    for d in docs:
        key = None if d.get("name") is None else str(d["name"])
        bodies[key] = {k: v for k, v in d.items() if k != "name"}
    deps = {k: _refs(b, set(names) - {k}) for k, b in bodies.items()}
    for k, body in bodies.items():  # every stage checked before any merge runs
        _check(body, full=not deps[k])
    order: list = []
    state: dict = {}

    def visit(k, path=()):
        if state.get(k) == "done":
            return
        if state.get(k) == "visiting":
            raise MergeError(f"stages depend on each other in a cycle: {' -> '.join(map(str, path + (k,)))}")
        state[k] = "visiting"
        for dep in sorted(deps[k]):
            visit(dep, path + (k,))
        state[k] = "done"
        order.append(k)

    final_key = None if unnamed else final_name
    visit(final_key)
    for k in bodies:  # stages the final merge does not use are built too (mergekit-multi builds every document)
        visit(k)
    order.remove(final_key)
    order.append(final_key)
    return [(k or "final", _substitute(bodies[k], folders), Path(folders[k]) if k is not None else out) for k in order]


def _check(body: dict, full: bool) -> None:
    """A stage's schema, method and parameter names; with ``full`` (it uses no other stage, so its inputs
    exist) its whole plan (headers only)."""
    from .methods.base import get_method
    from .plan import Planner

    rec = load_recipe(dict(body))
    if full:
        Planner(rec).build()
    else:
        Planner(rec)._validate_param_names(get_method(rec.merge_method))


def built(folder: Path) -> bool:
    """Whether ``folder`` already holds a merged model (config and weights)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
