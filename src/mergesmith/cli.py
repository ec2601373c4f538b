"""The `mergesmith` command.

Start-up stays fast: this module imports only typer; torch, transformers, peft and matplotlib are
imported inside the commands that use them. Sub-command groups live in their own packages and are
attached here through a ``register(app)`` function each (see ``COMMAND_MODULES``).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="mergesmith",
    help="Merge neural-network checkpoints: streaming, bounded memory, every published method.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add commands with `register(app: typer.Typer) -> None`. Each must import only typer
# (and the standard library) at module level.
COMMAND_MODULES = [
    "mergesmith.lora.cli",
    "mergesmith.continual.cli",
    "mergesmith.compress.cli",
    "mergesmith.bench.cli",
]


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_user_errors(fn, *args, **kwargs):
    """Call fn, turning MergeError into one clear line and exit code 2."""
    from .methods.base import MergeError

    try:
        return fn(*args, **kwargs)
    except MergeError as e:
        fail(str(e))


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML (mergekit-compatible)"),
    out_arg: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="output folder (as mergekit-yaml's), or -o"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; read no weights"),
    device: str = typer.Option("cpu", "--device", help="compute device: cpu, cuda, cuda:1, auto"),
    cuda: bool = typer.Option(False, "--cuda", help="the same as --device cuda (mergekit-yaml's flag)"),
    threads: Optional[int] = typer.Option(None, "--threads", "-j", help="compute threads (default: all cores)"),
    shard_size: str = typer.Option("2GB", "--shard-size", "--out-shard-size", help="maximum output shard size, e.g. 400MB, 5GB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output folder"),
    seed: Optional[int] = typer.Option(None, "--seed", "--random-seed", help="random seed (overrides the recipe's)"),
    defaults: Optional[str] = typer.Option(None, "--defaults",
                                           help="parameter defaults: paper (the default) or mergekit (mergekit 0.1.5's "
                                                "defaults and settings, e.g. TIES per tensor, DARE's L1 rescale; "
                                                "overrides the recipe's `defaults:`)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    stages_dir: Optional[Path] = typer.Option(None, "--intermediate-dir", "-I",
                                              help="multi-stage recipes: folder of the named stages (default OUT-stages)"),
    _mergekit_flags: bool = typer.Option(False, "--copy-tokenizer", "--lazy-unpickle", "--allow-crimes",
                                         help="accepted so mergekit-yaml command lines run, no effect here: the "
                                              "tokenizer is always written, inputs are read tensor by tensor (.bin "
                                              "memory-mapped, weights_only), architectures are not compared, shapes are"),
):
    """Merge the models of RECIPE into OUT (`mergesmith merge recipe.yml out/` or `-o out/`). A RECIPE of
    several YAML documents with `name`s is a multi-stage merge (mergekit-multi's format)."""
    from .run import run_recipe

    if out is not None and out_arg is not None and out != out_arg:
        fail(f"two output folders given: {out_arg} and -o {out}")
    out = out or out_arg
    if out is None:
        fail("give the output folder: mergesmith merge RECIPE OUT (or -o OUT)")
    if cuda:
        device = "cuda"

    def go():
        result = run_recipe(
            recipe, out, dry_run=dry_run, device=device, threads=threads, shard_size=shard_size,
            overwrite=overwrite, seed=seed, progress=not quiet, stages_dir=stages_dir, defaults=defaults,
        )
        if dry_run:
            typer.echo(result.describe())
            return
        for w in result.warnings:
            typer.echo(f"warning: {w}", err=True)
        if not quiet:
            typer.echo(f"wrote {out}")

    run_user_errors(go)


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="show one method in full")):
    """List merge methods, or describe one (paper, math, parameters with defaults, granularity)."""
    from .methods.base import get_method, list_methods

    if name:
        typer.echo(run_user_errors(get_method, name).describe())
        return
    for spec in list_methods():
        base = {"required": "base", "optional": "base?", "none": "-"}[spec.base]
        typer.echo(f"{spec.name:<20} {spec.granularity:<9} {base:<6} {spec.paper}")


_ATTACHED = False


def _attach_plugins() -> None:
    global _ATTACHED
    if _ATTACHED:
        return
    _ATTACHED = True
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (mod_name.startswith(e.name) or e.name.startswith(mod_name)):
                continue  # that command group is not installed
            raise
        mod.register(app)


def main(argv: Optional[List[str]] = None) -> None:
    # OpenMP threads that spin while waiting steal the cores of a shared machine: with other jobs running,
    # an SVD + eigh + 20 GEMMs of 2048^2 (2 threads) took 54-65 s with the default policy and 21-26 s with
    # PASSIVE (load 2.6-4.5, docs/performance.md). It must be set before torch starts its OpenMP pool, i.e.
    # before torch is imported: this module imports only typer. An explicit setting is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _attach_plugins()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="mergesmith")


def console() -> None:
    """The installed ``mergesmith`` command: :func:`main`, then the process ends without tearing the interpreter
    down (unloading torch, numba and the buffer pool took ~0.7 s after a merge whose output was already complete
    and renamed). Output streams and logging are flushed first; an uncaught exception ends the normal way."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that closed early (`| head`), a closed stream
            pass
    os._exit(int(code or 0))


if __name__ == "__main__":
    console()
