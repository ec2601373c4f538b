"""Run a recipe to an output folder: plan, execute into a temporary folder, finalize, rename.

An interrupted or failed merge leaves no partial output: everything is written into
``.<name>.mergesmith-tmp-<pid>`` beside the target and renamed at the end.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .io.atomic import check_free_space, check_output_dir, staging
from .io.card import write_extras
from .io.writer import ShardedWriter, parse_size
from .methods.base import MergeError
from .plan import Plan, Planner
from .recipe import Recipe, check_defaults, load_recipe


def plan_recipe(recipe: Any, seed: int | None = None, defaults: str | None = None) -> Plan:
    """Validate a recipe and build its plan (reads headers only); ``defaults`` (paper / mergekit) replaces the
    recipe's ``defaults:``."""
    rec = load_recipe(recipe)
    if defaults is not None:
        rec = rec.model_copy(update={"defaults": check_defaults(defaults)})
    return Planner(rec, seed=seed).build()


def run_recipe(
    recipe: str | Path | dict | Recipe,
    out: str | Path,
    *,
    dry_run: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    shard_size: str | int = "2GB",
    overwrite: bool = False,
    seed: int | None = None,
    progress: bool = False,
    stages_dir: str | Path | None = None,
    defaults: str | None = None,
) -> Plan:
    """Merge a recipe into ``out`` (an HF folder). Returns the executed (or, with dry_run, planned) Plan; for a
    multi-stage recipe (several YAML documents, ``multi``) a :class:`StagesPlan`."""
    out = Path(out).resolve()
    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise MergeError(str(e)) from None
    docs = _documents(recipe)
    if docs is not None:
        return _run_stages(docs, out, stages_dir, dry_run=dry_run, device=device, threads=threads,
                           shard_size=shard_size, overwrite=overwrite, seed=seed, progress=progress, defaults=defaults)
    if not dry_run:
        check_output_dir(out, overwrite)
    plan = plan_recipe(recipe, seed=seed, defaults=defaults)
    if dry_run:
        return plan
    write_plan(plan, out, device=device, threads=threads, shard_size=size, overwrite=overwrite, progress=progress)
    return plan


def _documents(recipe: Any) -> list[dict] | None:
    """The documents of a multi-stage recipe file or text, else None (one recipe)."""
    if not isinstance(recipe, (str, Path)):
        return None
    from .multi import documents

    text = str(recipe)
    p = Path(text)
    if "\n" not in text and p.suffix in (".yml", ".yaml"):
        if not p.is_file():
            return None  # load_recipe says so
        text = p.read_text()
    return documents(text) if "---" in text else None


class StagesPlan:
    """What a multi-stage recipe ran (or, dry, would run): one line per stage; the final stage's warnings."""

    def __init__(self, lines: list[str], warnings: list[str], final: Plan | None):
        self.lines, self.warnings, self.final = lines, warnings, final

    def describe(self) -> str:
        return "\n".join(self.lines + ([self.final.describe()] if self.final is not None else []))


def _run_stages(docs: list[dict], out: Path, stages_dir, *, dry_run: bool, **kw) -> StagesPlan:
    from .multi import built, stages

    todo = stages(docs, out, None if stages_dir is None else Path(stages_dir).resolve())
    if not dry_run:
        check_output_dir(out, kw.get("overwrite", False))
    lines, warnings, final = [], [], None
    for k, (name, body, folder) in enumerate(todo):
        last = k == len(todo) - 1
        if not last and built(folder):
            lines.append(f"stage {name}: {folder} (built before, kept)")
            continue
        if dry_run:
            try:
                plan = plan_recipe(body, seed=kw.get("seed"), defaults=kw.get("defaults"))
            except MergeError as e:
                lines.append(f"stage {name}: {folder} (planned once the stages it uses are built; now: {e})")
                continue
            lines.append(f"stage {name}: {folder} ({len(plan.jobs)} tensors)")
            final = plan if last else final
            continue
        if not last:
            folder.parent.mkdir(parents=True, exist_ok=True)
        plan = run_recipe(body, folder, **kw)
        lines.append(f"stage {name}: {folder}")
        warnings += [f"stage {name}: {w}" for w in plan.warnings]
        final = plan if last else final
    return StagesPlan(lines, warnings, final)


def write_plan(plan: Plan, out: Path, *, device="cpu", threads=None, shard_size: int = 2 * 10**9,
               overwrite: bool = False, progress: bool = False) -> None:
    """Execute ``plan`` into the folder ``out`` (atomically)."""
    from .engine import execute

    with staging(out, overwrite, check=False) as tmp:
        check_free_space(tmp, plan.output_bytes, f"the merged model {out}")
        started = time.time()
        writer = ShardedWriter(tmp, plan.entries(), shard_size, metadata={"mergesmith_method": plan.method.name})
        try:
            execute(plan, writer, device=device, threads=threads, progress=progress)
        finally:
            writer.close()
        missing = set(plan.entries()) - writer.written
        if missing:
            raise RuntimeError(f"internal error: {len(missing)} tensors were not written, e.g. {sorted(missing)[0]}")
        write_extras(plan, tmp, seconds=time.time() - started)
