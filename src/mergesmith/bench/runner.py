"""Run merge methods and recipes on a zoo, evaluate them, and collect the results.

Method entries (``--methods``): ``NAME`` or ``NAME:key=value:key=value`` (any registered method or
alias), or a recipe YAML path. A recipe may leave out ``models``/``base_model`` (the zoo's experts and
base are filled in) and may write ``{zoo}`` for the zoo folder, e.g. ``model: "{zoo}/experts/shapes"``.

Methods without user parameters run with the no-validation defaults of the methods spec (section 18.1,
``NO_VALIDATION_DEFAULTS``); the table shows every value used.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..methods.base import MergeError, get_method
from .evaluate import reference_scores, score
from .zoo import Zoo

# Section 18.1 of the methods spec: defaults when there is no validation data. TA: lambda 0.3 for ~8
# tasks; TIES: k = 20 %, dis-mean, lambda 1; DARE: p <= 0.5 for deltas that are not tiny SFT deltas
# (ours are from-scratch fine-tunes of a small model), combined with TA's lambda or TIES; Consensus:
# fixed lambda_t 0.5, k 2, TA's lambda (Consensus-TIES uses dis-sum, hence lambda 0.3 too); PCB: r 0.1, lambda 1; DELLA: p 0.3, eps 0.07, lambda 1.1;
# Breadcrumbs: keep 0.15, drop-top 0.006, alpha 0.2 (official search start).
NO_VALIDATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_linear": {"density": 0.5, "lambda": 0.3},
    "dare_ties": {"density": 0.5, "lambda": 1.0},
    "consensus_ta": {"k": 2, "mask_lambda": 0.5, "lambda": 0.3},
    "consensus_ties": {"density": 0.2, "k": 2, "mask_lambda": 0.5, "lambda": 0.3},
    "pcb": {"ratio": 0.1, "lambda": 1.0},
    "tsv_m": {"alpha": 1.0},
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "breadcrumbs": {"density": 0.15, "gamma": 0.006, "lambda": 0.2},
}


@dataclass
class Entry:
    label: str
    method: str | None = None  # canonical registered name
    params: dict = field(default_factory=dict)
    recipe: Path | None = None
    group: str = ""  # sweeps: the entry this one was expanded from
    sweep_value: float | None = None
    note: str = ""


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_entries(specs: list[str]) -> list[Entry]:
    """``["average,ties:density=0.3", "my.yaml"]`` -> entries (comma-separated, option repeatable)."""
    out: list[Entry] = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            if item.endswith((".yml", ".yaml")):
                path = Path(item).expanduser()
                if not path.is_file():
                    raise MergeError(f"recipe not found: {item}")
                out.append(Entry(label=path.stem, recipe=path))
                continue
            name, *kvs = item.split(":")
            canonical = get_method(name).name
            params = {}
            for kv in kvs:
                if "=" not in kv:
                    raise MergeError(f"bad method parameter '{kv}' in '{item}'; write NAME:key=value:key=value")
                k, v = kv.split("=", 1)
                params[k.strip()] = _value(v.strip())
            label = name if not kvs else item
            out.append(Entry(label=label, method=canonical, params=params))
    if not out:
        raise MergeError("no methods given; e.g. --methods average,task_arithmetic,ties")
    return out


def parse_sweep(text: str | None) -> tuple[str, list[float]] | None:
    """``lambda=0.1:1.0:0.1`` (start:stop:step, stop included) or ``lambda=0.2,0.5,1``."""
    if not text:
        return None
    if "=" not in text:
        raise MergeError(f"bad --sweep '{text}'; write PARAM=start:stop:step or PARAM=v1,v2,...")
    name, spec = (s.strip() for s in text.split("=", 1))
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise MergeError(f"bad --sweep values '{spec}'; write start:stop:step with step > 0, or v1,v2,...") from None
    if not values or len(values) > 200:
        raise MergeError(f"--sweep gives {len(values)} values; give 1 to 200")
    return name, values


def method_params(entry: Entry) -> tuple[dict, str]:
    """The parameters a method entry runs with: spec example < no-validation defaults < user values."""
    spec = get_method(entry.method)
    declared = {p.name for p in spec.params}
    params = dict(NO_VALIDATION_DEFAULTS.get(spec.name, spec.example))
    dropped = sorted(k for k in params if k not in declared)
    params = {k: v for k, v in params.items() if k in declared}
    params.update(entry.params)
    note = f"default(s) {', '.join(dropped)} not declared by the method; left out" if dropped else ""
    return params, note


def expand_sweep(entries: list[Entry], sweep: tuple[str, list[float]] | None) -> list[Entry]:
    if sweep is None:
        return entries
    name, values = sweep
    out = []
    for e in entries:
        if e.method is None or get_method(e.method).param(name) is None:
            e.note = f"no '{name}' parameter; run once" if e.method else "recipe; run once"
            out.append(e)
            continue
        for v in values:
            out.append(Entry(label=f"{e.label} {name}={v:g}", method=e.method, params={**e.params, name: v},
                             group=e.label, sweep_value=v))
    return out


def _check_runnable(entry: Entry, n_models: int) -> str | None:
    spec = get_method(entry.method)
    if n_models < spec.min_models or (spec.max_models is not None and n_models > spec.max_models):
        most = "" if spec.max_models is None else f"..{spec.max_models}"
        return f"takes {spec.min_models}{most} models, the zoo has {n_models} experts"
    return None


def _load_recipe(entry: Entry, zoo: Zoo) -> dict:
    import yaml

    text = entry.recipe.read_text().replace("{zoo}", str(zoo.root))
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise MergeError(f"{entry.recipe}: not a recipe mapping")
    if not data.get("models") and not data.get("slices"):
        data["models"] = [{"model": str(p)} for p in zoo.expert_paths()]
    method = get_method(data.get("merge_method", ""))
    if "base_model" not in data and method.base != "none":
        data["base_model"] = str(zoo.path("base"))
    return data


def merge_entry(entry: Entry, zoo: Zoo, base_sd: dict, expert_sds: list[dict], seed: int) -> tuple[dict, dict]:
    """Merged state dict and the parameters used."""
    if entry.recipe is not None:
        from ..io.checkpoint import open_checkpoint
        from ..run import run_recipe

        data = _load_recipe(entry, zoo)
        with tempfile.TemporaryDirectory(prefix="mergesmith-bench-") as tmp:
            out = Path(tmp) / "merged"
            run_recipe(data, out, seed=seed)
            ck = open_checkpoint(out)
            sd = {k: ck.get(k).clone() for k in ck.keys()}
            ck.close()
        return sd, {"recipe": str(entry.recipe), "merge_method": data.get("merge_method"),
                    **(data.get("parameters") or {})}
    from ..api import merge_state_dicts

    spec = get_method(entry.method)
    params, _ = method_params(entry)
    base = None if spec.base == "none" else base_sd
    return merge_state_dicts(spec.name, expert_sds, base=base, seed=seed, **params), params


def run_bench(zoo: Zoo, entries: list[Entry], *, seed: int = 0, log: Callable[[str], None] | None = None,
              refs: dict | None = None, sweep: tuple[str, list[float]] | None = None) -> dict[str, Any]:
    """Merge and evaluate every entry; returns the results record (see ``report.write_report``)."""
    import torch

    log = log or (lambda msg: None)
    refs = refs or reference_scores(zoo)
    base_sd = zoo.state_dict("base")
    expert_sds = [zoo.state_dict(t) for t in zoo.tasks]
    runs = []
    for e in entries:
        row: dict[str, Any] = {"label": e.label, "method": e.method, "group": e.group or e.label,
                               "sweep_value": e.sweep_value, "note": e.note}
        if e.method is not None:
            row["params"], extra = method_params(e)
            row["note"] = "; ".join(x for x in (e.note, extra) if x)
            why = _check_runnable(e, len(expert_sds))
            if why:
                row.update(status="skipped", note=why)
                log(f"skip {e.label}: {why}")
                runs.append(row)
                continue
        started = time.time()
        try:
            sd, params = merge_entry(e, zoo, base_sd, expert_sds, seed)
        except MergeError as err:
            row.update(status="failed", note=str(err))
            log(f"{e.label}: {err}")
            runs.append(row)
            continue
        merged_at = time.time()
        result = score(zoo, refs, zoo.evaluate(sd))
        row.update(status="ok", params=params, merge_seconds=round(merged_at - started, 3),
                   eval_seconds=round(time.time() - merged_at, 3), **result)
        log(f"{e.label}: average {result['average']:.4f}, normalized {result['normalized_average']:.3f}")
        runs.append(row)
        del sd
    return {
        "zoo": {"name": zoo.name, "version": zoo.family.version, "size": zoo.manifest.get("size"),
                "seed": zoo.manifest.get("seed"), "root": str(zoo.root), "description": zoo.family.description,
                "merge_note": zoo.family.merge_note, "build_seconds": zoo.manifest.get("build_seconds")},
        "metric": zoo.family.metric, "higher_is_better": zoo.family.higher_is_better,
        "tasks": zoo.tasks, "seed": seed, "references": refs,
        "reference_rows": {k: score(zoo, refs, refs[k]) for k in ("base", "multitask")},
        "runs": runs, "torch": torch.__version__,
        "sweep": {"param": sweep[0], "values": sweep[1]} if sweep else None,
    }
