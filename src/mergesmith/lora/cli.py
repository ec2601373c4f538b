"""`mergesmith lora-merge` and `mergesmith extract-lora`. Imports only typer and the standard library at
module level (fast `--help`); the work is imported inside the commands."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

METHOD_HELP = ("cat (exact), svd (exact at full rank), ties, dare_ties, dare_linear, magnitude_prune "
               "(on ΔW, then SVD), linear and factorwise_* (PEFT's factor-wise types), lego (LoRA-LEGO)")


def _weights(weight: Optional[List[float]], n: int):
    from ..methods.base import MergeError

    if not weight:
        return None
    if len(weight) == 1 and n > 1:
        return weight * n
    if len(weight) != n:
        raise MergeError(f"{n} adapter(s) but {len(weight)} --weight value(s); give one per adapter (or one for all)")
    return list(weight)


def lora_merge(
    adapters: List[Path] = typer.Argument(..., help="PEFT LoRA adapter folders of one base model"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (an adapter, or a full model with --into-base)"),
    method: str = typer.Option("svd", "-m", "--method", help=METHOD_HELP),
    weight: Optional[List[float]] = typer.Option(None, "-w", "--weight", help="per-adapter weight, repeat once per adapter (default 1)"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="output rank for svd-family and lego (default: largest input rank)"),
    density: Optional[float] = typer.Option(None, "--density", help="kept fraction for ties/dare/magnitude_prune"),
    majority_sign: str = typer.Option("total", "--majority-sign", help="TIES sign election: total or frequency"),
    svd_clamp: Optional[float] = typer.Option(None, "--svd-clamp", help="clamp SVD factors to this quantile (PEFT svd_clamp)"),
    seed: int = typer.Option(0, "--seed", help="random seed (dare, lego)"),
    svd: str = typer.Option("exact", "--svd", help="SVD of dense ties/dare/magnitude_prune deltas: exact or randomized (fast, approximate)"),
    into_base: bool = typer.Option(False, "--into-base", help="write base + merged ΔW as a full HF model"),
    base: Optional[Path] = typer.Option(None, "--base", help="base model folder (with --into-base; default: the adapters' base_model_name_or_path)"),
    modules_to_save: str = typer.Option("error", "--modules-to-save", help="when adapters carry different full tensors: error, first or average"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype: float32, float16, bfloat16"),
    shard_size: str = typer.Option("2GB", "--shard-size", help="maximum shard size with --into-base"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output folder"),
):
    """Merge LoRA adapters into one PEFT adapter (or, with --into-base, into their base model)."""
    from ..cli import run_user_errors

    def go():
        from ..methods.base import MergeError
        from .adapter import open_adapter
        from .merge import merge_adapters, merge_adapters_into_base

        ads = [open_adapter(a) for a in adapters]
        w = _weights(weight, len(ads))
        common = dict(weights=w, method=method, rank=rank, density=density, majority_sign=majority_sign,
                      seed=seed, dtype=dtype, modules_to_save=modules_to_save, overwrite=overwrite, svd_method=svd)
        if into_base:
            b = base or ads[0].base_model
            if b is None or not Path(str(b)).exists():
                raise MergeError("--into-base needs --base BASE_MODEL_FOLDER (the adapters' base_model_name_or_path is not a local folder)")
            merge_adapters_into_base(b, ads, out, shard_size=shard_size, **common)
            typer.echo(f"wrote {out} (base {b} + {len(ads)} adapter(s), method {method})")
            return
        if base is not None:
            raise MergeError("--base is only used with --into-base")
        merged = merge_adapters(ads, out, svd_clamp=svd_clamp, **common)
        for msg in merged.warnings:
            typer.echo(f"warning: {msg}", err=True)
        ranks = sorted({m.rank for m in merged.modules})
        typer.echo(f"wrote {out}: {len(merged.modules)} module(s), rank {ranks[0]}" + (f"..{ranks[-1]}" if len(ranks) > 1 else ""))

    run_user_errors(go)


def extract_lora_cmd(
    fine_tuned: Path = typer.Argument(..., help="fully fine-tuned model folder"),
    base: Path = typer.Option(..., "--base", help="its base model folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output adapter folder"),
    rank: int = typer.Option(32, "--rank", "-r", help="maximum rank per module"),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="drop singular values <= this"),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale", help="split sqrt(S) between A and B (else B = U S)"),
    embed_lora: bool = typer.Option(False, "--embed-lora", help="LoRA for embeddings (default: save them in full)"),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable", help="drop changed norms/biases instead of saving them in full"),
    include: Optional[List[str]] = typer.Option(None, "-i", "--include", help="regex on module names to include (repeatable)"),
    exclude: Optional[List[str]] = typer.Option(None, "-e", "--exclude", help="regex on module names to exclude (repeatable)"),
    svd: str = typer.Option("exact", "--svd", help="exact, or randomized (much faster on large matrices, approximate)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="adapter dtype (default: the fine-tune's)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the summary"),
):
    """Extract a LoRA adapter from FINE_TUNED (truncated SVD of each weight delta); prints the error per module."""
    from ..cli import run_user_errors

    def go():
        from .extract import extract_lora

        def show(m):
            if not quiet:
                typer.echo(f"{m.module:<60} {m.kind:<9} rank {m.rank:<5} rel. error {m.rel_error:.3e}")

        rep = extract_lora(fine_tuned, base, out, rank=rank, sv_epsilon=sv_epsilon, distribute_scale=distribute_scale,
                           embed_lora=embed_lora, skip_undecomposable=skip_undecomposable, include=include,
                           exclude=exclude, dtype=dtype, overwrite=overwrite, svd_method=svd, on_module=show)
        d = rep.to_dict()
        for msg in rep.warnings:
            typer.echo(f"warning: {msg}", err=True)
        typer.echo(f"wrote {out}: {len(rep.modules)} LoRA module(s), mean rel. error {d['mean_rel_error']:.3e}, "
                   f"max {d['max_rel_error']:.3e}; {len(rep.modules_to_save)} saved in full, {len(rep.dropped)} dropped "
                   f"(report: {out}/extract_report.json)")

    run_user_errors(go)


def register(app: typer.Typer) -> None:
    app.command("lora-merge")(lora_merge)
    app.command("extract-lora")(extract_lora_cmd)
