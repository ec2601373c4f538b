"""`mergesmith compress` and `mergesmith extract` (typer only at import time; torch inside commands)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n} B"


def _params(items: List[str]) -> dict:
    from ..methods.base import MergeError

    out = {}
    for item in items:
        if "=" not in item:
            raise MergeError(f"--param {item!r}: use KEY=VALUE, e.g. --param density=0.2")
        k, v = item.split("=", 1)
        import yaml

        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _lambdas(text: str):
    from ..methods.base import MergeError

    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise MergeError(f"--mask-lambda {text!r}: give a number or one number per expert, comma separated") from None
    return vals[0] if len(vals) == 1 else vals


def compress(
    experts: List[str] = typer.Argument(..., help="fine-tuned experts (HF folders or .safetensors files)"),
    base: str = typer.Option(..., "--base", "-b", help="the base (pre-trained) model they were fine-tuned from"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder of the compressed set"),
    method: str = typer.Option("tall", "--method", "-m", help="tall (TALL masks) or emr (EMR-Merging)"),
    names: Optional[str] = typer.Option(None, "--names", help="comma-separated task names (default: folder names)"),
    mask_lambda: str = typer.Option("0.5", "--mask-lambda", help="TALL lambda_t: one value or one per expert, comma separated"),
    strict: bool = typer.Option(False, "--strict", help="TALL mask with > (official code) instead of the paper's >="),
    merge: str = typer.Option("task_arithmetic", "--merge", help="TALL: base merge giving the stored vector (e.g. ties)"),
    param: List[str] = typer.Option([], "--param", "-p", help="KEY=VALUE parameter of the --merge method (repeatable)"),
    rescale: str = typer.Option("paper", "--rescale", help="EMR rescalers: paper (L1 sums) or code (per-tensor means)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dtype of the stored vector (default: the experts')"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output folder"),
):
    """Store N experts as one merged task vector + N bit-packed masks; report the bytes saved."""
    from ..cli import run_user_errors

    def go():
        from .build import compress_experts

        rep = compress_experts(
            base, experts, out, method=method, names=names.split(",") if names else None,
            mask_lambda=_lambdas(mask_lambda), strict=strict, merge=merge, merge_params=_params(param),
            rescale=rescale, dtype=dtype, overwrite=overwrite,
        )
        typer.echo(f"wrote {out} ({rep['method']}, {len(rep['tasks'])} tasks, {rep['seconds']} s)")
        typer.echo(f"  experts:  {_size(rep['experts_bytes'])}")
        typer.echo(f"  set:      {_size(rep['artefact_bytes'])}  (the base is needed in both cases)")
        typer.echo(f"  saved:    {_size(rep['saved_bytes'])}  ({rep['ratio']:.2f}x smaller)")
        typer.echo(f"  {'task':<20} {'scale':>8} {'mask density':>13} {'rel. error':>11}")
        for t in rep["tasks"]:
            typer.echo(f"  {t['name']:<20} {t['scale']:>8.4f} {t['mask_density']:>13.4f} {t['relative_error']:>11.4f}")

    run_user_errors(go)


def extract(
    artefact: Path = typer.Argument(..., help="a folder written by `mergesmith compress`"),
    task: str = typer.Option(..., "--task", "-t", help="task name or index"),
    out: Path = typer.Option(..., "-o", "--out", help="HF folder, or a file ending in .safetensors"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="base model (default: the one recorded at compression)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype (default: the experts')"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
):
    """Rebuild one expert from a compressed set."""
    from ..cli import run_user_errors

    def go():
        from .extract import extract_expert

        path = extract_expert(artefact, task, out, base=base, dtype=dtype, overwrite=overwrite)
        typer.echo(f"wrote {path}")

    run_user_errors(go)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("extract")(extract)
