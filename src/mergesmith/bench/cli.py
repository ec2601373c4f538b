"""``mergesmith demo``, ``mergesmith bench`` and ``mergesmith inspect``.

Only typer and the standard library are imported here; torch, matplotlib and the zoo load inside the
commands, so ``mergesmith --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

ZOO_HELP = "zoo family: classify (the demo family: image tasks, accuracy) or bytegpt (byte-level GPT-2 domains, loss)"


def register(app: typer.Typer) -> None:
    from ..cli import run_user_errors

    @app.command()
    def demo(
        out: Path = typer.Option(Path("mergesmith-report"), "--out", "-o", help="report folder (replaced if it is a previous report)"),
        zoo: str = typer.Option("classify", "--zoo", help=ZOO_HELP),
        seed: int = typer.Option(0, "--seed", help="merge seed (DARE's random drops)"),
        rebuild: bool = typer.Option(False, "--rebuild", help="rebuild the cached zoo"),
        threads: int = typer.Option(1, "--threads", "-j", help="torch threads for training and evaluation"),
        size: str = typer.Option("default", "--size", hidden=True, help="zoo size (tests use 'tiny')"),
    ):
        """Build (or reuse) the built-in demo zoo, merge it with several methods, print the comparison."""
        from .demo import run_demo

        run_user_errors(run_demo, out, zoo_name=zoo, size=size, seed=seed, rebuild=rebuild, threads=threads)

    @app.command()
    def bench(
        zoo: str = typer.Option("classify", "--zoo", help=ZOO_HELP),
        methods: Optional[List[str]] = typer.Option(
            None, "--methods", "-m",
            help="comma-separated methods, NAME or NAME:key=value:key=value, or recipe .yml files; repeatable "
                 "(default: the demo's methods)"),
        sweep: Optional[str] = typer.Option(None, "--sweep", help="sweep one parameter, e.g. lambda=0.1:1.0:0.1 or lambda=0.3,0.5"),
        seed: int = typer.Option(0, "--seed", help="merge seed; the same seed gives the same results"),
        out: Path = typer.Option(Path("mergesmith-bench"), "--out", "-o", help="report folder"),
        zoo_seed: int = typer.Option(0, "--zoo-seed", help="seed of the zoo build (another seed = another zoo)"),
        rebuild: bool = typer.Option(False, "--rebuild", help="rebuild the cached zoo"),
        threads: int = typer.Option(1, "--threads", "-j", help="torch threads for training and evaluation"),
        size: str = typer.Option("default", "--size", hidden=True, help="zoo size (tests use 'tiny')"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the table"),
    ):
        """Run merge methods or recipes on a zoo, evaluate, write results.json, a markdown table and plots."""

        def go():
            import torch
            from rich.console import Console

            from .demo import demo_entries, print_results
            from .report import check_out_dir, write_report
            from .runner import expand_sweep, parse_entries, parse_sweep, run_bench
            from .zoo import get_zoo

            console = Console()
            check_out_dir(out.resolve())
            entries = parse_entries(methods or [",".join(demo_entries()[0])])
            sw = parse_sweep(sweep)
            entries = expand_sweep(entries, sw)
            torch.set_num_threads(max(1, threads))
            log = (lambda msg: None) if quiet else (lambda msg: console.print(f"  [dim]{msg}[/dim]"))
            z = get_zoo(zoo, size=size, seed=zoo_seed, rebuild=rebuild, log=log, threads=threads)
            results = run_bench(z, entries, seed=seed, log=log, sweep=sw)
            files = write_report(results, out)
            print_results(console, results, f"{z.name}: {results['metric']} per task")
            if not quiet:
                console.print(f"wrote {', '.join(sorted(files))} to {out}")

        run_user_errors(go)

    @app.command()
    def inspect(
        models: Optional[List[str]] = typer.Argument(None, help="fine-tuned models (folders or .safetensors files)"),
        base: Optional[str] = typer.Option(None, "--base", "-b", help="the shared base model"),
        out: Path = typer.Option(Path("mergesmith-inspect"), "--out", "-o", help="report folder"),
        density: float = typer.Option(0.2, "--density", help="top-k fraction for the trimmed statistics (TIES k)"),
        tall_lambda: float = typer.Option(0.5, "--tall-lambda", help="TALL-mask threshold lambda"),
        labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated names for the models"),
        zoo: Optional[str] = typer.Option(None, "--zoo", help="inspect a zoo's experts against its base instead"),
        size: str = typer.Option("default", "--size", hidden=True, help="zoo size (tests use 'tiny')"),
    ):
        """Task-vector diagnostics without merging: norms, cosine similarity, sign conflicts, top-k overlap."""

        def go():
            from ..methods.base import MergeError

            nonlocal models, base
            if zoo:
                if models or base:
                    raise MergeError("give either --zoo or MODEL... --base BASE, not both")
            elif not models or not base:
                raise MergeError("give the models and --base BASE (or --zoo NAME)")
            else:
                for ref in [*models, base]:
                    if not Path(ref).exists():
                        raise MergeError(f"model not found: {ref}")
            from rich.console import Console
            from rich.table import Table

            from .inspect import inspect_models
            from .report import check_out_dir, inspect_summary, inspect_tables, write_inspect_report

            check_out_dir(out.resolve())
            console = Console()
            names = [s.strip() for s in labels.split(",")] if labels else None
            if zoo:
                from .zoo import get_zoo

                z = get_zoo(zoo, size=size, log=lambda m: console.print(f"  [dim]{m}[/dim]"))
                models, base, names = [str(p) for p in z.expert_paths()], str(z.path("base")), names or z.tasks
            res = inspect_models(models, base, density=density, tall_lambda=tall_lambda, labels=names,
                                 log=lambda m: console.print(f"[yellow]note[/yellow] {m}"))
            for title, header, rows in inspect_tables(res):
                t = Table(title=title, title_justify="left", header_style="bold")
                for i, h in enumerate(header):
                    t.add_column(h, justify="left" if i == 0 else "right", overflow="fold" if i == 0 else "ellipsis")
                for r in rows:
                    t.add_row(*r)
                console.print(t)
            console.print(inspect_summary(res))
            files = write_inspect_report(res, out)
            console.print(f"report: {files['index.html']}")

        run_user_errors(go)
