"""``mergesmith demo``: build (or reuse) the demo zoo, merge it with several methods, compare.

The method list covers the standard baselines and one method from the seed papers; a slot whose
method is not registered in this build is skipped with a note, so the demo never fails on it.
Parameters are the no-validation defaults of the methods spec (section 18.1), shown in the table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..methods.base import MergeError, get_method

# (slot, candidates in order of preference): the first registered candidate runs.
DEMO_SLOTS = [
    ("average", ["linear"]),
    ("task arithmetic", ["task_arithmetic"]),
    ("TIES", ["ties"]),
    ("DARE", ["dare_linear", "dare_ties"]),
    ("seed paper", ["tsv_m", "consensus_ta", "pcb"]),
]


def demo_entries() -> tuple[list[str], list[str]]:
    """Method names to run, and notes for the slots that have no registered method."""
    names, notes = [], []
    for slot, candidates in DEMO_SLOTS:
        for c in candidates:
            try:
                names.append(get_method(c).name)
                break
            except MergeError:
                continue
        else:
            notes.append(f"{slot}: skipped, none of {', '.join(candidates)} is registered in this build")
    return names, notes


def print_results(console, results: dict, title: str) -> None:
    """The comparison table (rich): references, then one row per run with its parameters below the name."""
    from rich import box
    from rich.table import Table

    from .report import table

    header, rows = table(results)
    t = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True)
    t.add_column("model", min_width=16, overflow="fold")
    for h in header[2:-2]:
        t.add_column(h, justify="right", no_wrap=True, min_width=5, max_width=7)
    t.add_column("avg", justify="right", no_wrap=True, min_width=5)
    t.add_column("norm.", justify="right", no_wrap=True, min_width=5)
    labels = {"base (pretrained)": "base", "experts (each on its own task)": "experts (own task)",
              "multi-task (upper bound)": "multi-task"}
    n_refs = 3
    for i, r in enumerate(rows):
        name = labels.get(r[0], r[0]) + (f"\n[dim]{r[1]}[/dim]" if r[1] else "")
        t.add_row(name, *r[2:], style="dim" if i < n_refs else None, end_section=i == n_refs - 1)
    console.print(t)


def run_demo(out: Path, *, zoo_name: str = "classify", size: str = "default", seed: int = 0,
             rebuild: bool = False, threads: int = 1, console=None) -> dict[str, Any]:
    """Everything ``mergesmith demo`` does; returns the results record."""
    import torch
    from rich.console import Console

    from .report import check_out_dir, write_report
    from .runner import parse_entries, run_bench
    from .zoo import get_family, get_zoo, zoo_dir

    console = console or Console()
    out = Path(out)
    check_out_dir(out.resolve())
    torch.set_num_threads(max(1, threads))
    family = get_family(zoo_name)
    names, notes = demo_entries()
    started = time.time()
    cached = not rebuild and (zoo_dir(family, size, 0) / "zoo.json").exists()
    console.print(f"[bold]mergesmith demo[/bold]: zoo [cyan]{family.name}[/cyan] ({family.description})")
    console.print(("reusing the cached zoo in " if cached else "building the zoo (once, cached) in ")
                  + str(zoo_dir(family, size, 0)))
    log = lambda msg: console.print(f"  [dim]{msg}[/dim]")  # noqa: E731
    zoo = get_zoo(zoo_name, size=size, rebuild=rebuild, log=log, threads=threads)
    built = time.time()
    console.print(f"merging {len(zoo.tasks)} experts with: {', '.join(names)}")
    results = run_bench(zoo, parse_entries([",".join(names)]), seed=seed, log=log)
    for n in notes:
        results["runs"].append({"label": n.split(":")[0], "status": "skipped", "note": n.split(": ", 1)[1]})
    results["timing"] = {"zoo_seconds": round(built - started, 1), "zoo_cached": cached,
                         "bench_seconds": round(time.time() - built, 1),
                         "eval_seconds_per_model": round(results["references"]["eval_seconds_per_model"], 2)}
    files = write_report(results, out)
    print_results(console, results, f"{zoo.name}: {results['metric']} per task (normalized = relative to the experts)")
    for n in notes:
        console.print(f"[yellow]note[/yellow] {n}")
    console.print(f"zoo {'reused' if cached else 'built'} in {results['timing']['zoo_seconds']:.0f}s, "
                  f"merges and evaluation in {results['timing']['bench_seconds']:.0f}s")
    console.print(f"report: {files['index.html'].parent}  (index.html, results.md, results.json, plots)")
    return results
