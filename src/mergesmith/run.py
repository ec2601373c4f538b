"""Run a recipe to an output folder: plan, execute into a temporary folder, finalize, rename.

An interrupted or failed merge leaves no partial output: everything is written into
``.<name>.mergesmith-tmp-<pid>`` beside the target and renamed at the end.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .io.atomic import check_output_dir, staging
from .io.card import write_extras
from .io.writer import ShardedWriter, parse_size
from .methods.base import MergeError
from .plan import Plan, Planner
from .recipe import Recipe, load_recipe


def plan_recipe(recipe: Any, seed: int | None = None) -> Plan:
    """Validate a recipe and build its plan (reads headers only)."""
    rec = load_recipe(recipe)
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
) -> Plan:
    """Merge a recipe into ``out`` (an HF folder). Returns the executed (or, with dry_run, planned) Plan."""
    out = Path(out).resolve()
    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise MergeError(str(e)) from None
    if not dry_run:
        check_output_dir(out, overwrite)
    plan = plan_recipe(recipe, seed=seed)
    if dry_run:
        return plan
    write_plan(plan, out, device=device, threads=threads, shard_size=size, overwrite=overwrite, progress=progress)
    return plan


def write_plan(plan: Plan, out: Path, *, device="cpu", threads=None, shard_size: int = 2 * 10**9,
               overwrite: bool = False, progress: bool = False) -> None:
    """Execute ``plan`` into the folder ``out`` (atomically)."""
    from .engine import execute

    with staging(out, overwrite, check=False) as tmp:
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
