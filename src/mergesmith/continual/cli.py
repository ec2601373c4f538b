"""`mergesmith continual init|add|export|status`: keep a small state folder and fold in each new
fine-tune as it appears.  Imports only typer and the standard library at module level (fast ``--help``);
the work is imported inside the commands."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

METHODS_HELP = ("opcm (orthogonal projection, order dependent), average (running mean, no base), "
                "task_arithmetic (lambda 0.3), ties (continual TIES, lambda 0.5, density 0.2)")


def _run(fn):
    from ..cli import run_user_errors

    return run_user_errors(fn)


def _params(items: Optional[List[str]]) -> dict:
    from ..methods.base import MergeError

    out = {}
    for it in items or []:
        if "=" not in it:
            raise MergeError(f"--param '{it}': use NAME=VALUE, e.g. --param alpha=0.6")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def init(
    state: Path = typer.Argument(..., help="state folder to create"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="base (pre-trained) model: HF folder or safetensors file"),
    method: str = typer.Option("opcm", "--method", "-m", help=METHODS_HELP),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="method parameter NAME=VALUE (repeat)"),
    seed: int = typer.Option(0, "--seed", help="seed recorded with the state (order shuffles, randomised methods)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing state"),
):
    """Start a continual merge in STATE over a base model."""

    def go():
        from .api import ContinualMerger

        man = ContinualMerger(state).init(base, method=method, seed=seed, overwrite=overwrite, **_params(param))
        typer.echo(f"initialised {state}: {man['method']} {json.dumps(man['params'])}"
                   + (f", base {man['base']['ref']}" if man.get("base") else ""))

    _run(go)


def add(
    state: Path = typer.Argument(..., help="state folder (from `continual init`)"),
    models: List[str] = typer.Argument(..., help="fine-tuned model(s) to fold in, in this order"),
    label: Optional[str] = typer.Option(None, "--label", help="name recorded in the history (one model only)"),
    shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="fold the given models in an order drawn from this seed"),
    allow_duplicate: bool = typer.Option(False, "--allow-duplicate", help="accept a model whose weights were already added"),
    device: str = typer.Option("cpu", "--device", help="compute device: cpu, cuda, cuda:1, auto"),
    threads: Optional[int] = typer.Option(None, "--threads", "-j", help="compute threads (default: all cores)"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="tensors computed at once, one thread "
                                          "each (default: cores, at most 4; 1 = one tensor with --threads threads)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing on success"),
):
    """Fold MODELS into the merge in STATE, one at a time (each add is atomic)."""

    def go():
        from ..methods.base import MergeError

        if label is not None and len(models) != 1:
            raise MergeError("--label names one model; give one model per `add` to label each")
        for m in models:
            if not Path(m).expanduser().exists():
                raise MergeError(f"model not found: {m}")
        import torch

        from .api import ContinualMerger
        from .opcm import permutation

        if threads:
            torch.set_num_threads(threads)
        order = list(models)
        if shuffle_seed is not None:
            order = [models[i] for i in permutation(len(models), shuffle_seed)]
        n = workers if workers is not None else (1 if device != "cpu" or threads else min(4, os.cpu_count() or 1))
        cm = ContinualMerger(state, device=device, workers=n)
        for m in order:
            entry = cm.add(m, label=label, allow_duplicate=allow_duplicate)
            if not quiet:
                extra = ""
                s = entry.get("summary") or {}
                if "lambda_t" in s:
                    extra = f"; lambda_t {s['lambda_t']:.4g} (sqrt t = {s['sqrt_t']:.4g})"
                typer.echo(f"added #{entry['index']} {entry['source']} in {entry['seconds']:.1f} s{extra}")

    _run(go)


def export(
    state: Path = typer.Argument(..., help="state folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (Hugging Face layout)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the base's)"),
    shard_size: str = typer.Option("2GB", "--shard-size", help="maximum output shard size, e.g. 400MB, 5GB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing on success"),
):
    """Write the current merged model of STATE to OUT."""

    def go():
        from .api import ContinualMerger

        ContinualMerger(state).export(out, dtype=dtype, shard_size=shard_size, overwrite=overwrite)
        if not quiet:
            typer.echo(f"wrote {out}")

    _run(go)


def status(
    state: Path = typer.Argument(..., help="state folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Show the method, parameters, models folded in (in order) and the state's size."""

    def go():
        from .api import ContinualMerger

        st = ContinualMerger(state).status()
        if as_json:
            typer.echo(json.dumps(st, indent=1))
            return
        typer.echo(f"method:  {st['method']} {json.dumps(st['params'])} seed {st['seed']}"
                   + ("  (order dependent)" if st["order_dependent"] else ""))
        typer.echo(f"base:    {st['base'] or '-'}")
        typer.echo(f"models:  {st['count']}    state: {st['state_bytes'] / 1e6:.1f} MB    updated {st['updated']}")
        for k, v in (st.get("summary") or {}).items():
            typer.echo(f"  {k}: {v:.6g}")
        for h in st["history"]:
            typer.echo(f"  #{h['index']:<3} {h['source']}  ({h['added']}, {h['seconds']} s)")

    _run(go)


def register(app: typer.Typer) -> None:
    grp = typer.Typer(
        help="Continual merging: fold fine-tunes into a small state folder as they arrive (OPCM and baselines).",
        no_args_is_help=True,
    )
    grp.command("init")(init)
    grp.command("add")(add)
    grp.command("export")(export)
    grp.command("status")(status)
    app.add_typer(grp, name="continual")
