"""Rebuild one expert from a compressed set: theta_t = theta_0 + scale_t * mask_t * vector.

Streams tensor by tensor into a state dict (in memory), a single ``.safetensors`` file, or a Hugging
Face folder (config.json and tokenizer files copied from the base folder). Output is written beside
the target under a temporary name and renamed at the end.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..methods.base import MergeError
from .storage import DTYPES, Artefact


def extract_expert(
    artefact: str | Path,
    task: int | str,
    out: str | Path | None = None,
    *,
    base: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
    shard_size: str | int = "2GB",
) -> dict[str, torch.Tensor] | Path:
    """Rebuild task ``task`` (name or index). ``out=None`` returns the state dict; a path ending in
    ``.safetensors`` writes one file; any other path writes an HF folder. ``base`` defaults to the base
    recorded at compression time."""
    from ..io.card import TOKENIZER_FILES
    from ..io.checkpoint import open_checkpoint
    from ..io.writer import ShardedWriter, parse_size
    from ..io.atomic import check_output_dir, replace_dir as _replace

    art = Artefact(artefact)
    t = art.task_index(task)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    ref = base if base is not None else art.manifest["base"].get("source")
    if ref is None:
        raise MergeError("this set was compressed from an in-memory base; give the base model (--base)")
    b_ck = open_checkpoint(ref, label="base")
    for name, info in art.tensors.items():
        if name not in b_ck:
            raise MergeError(f"base {b_ck.label} has no tensor {name}; is it the base the set was built from?")
        if list(b_ck.meta(name).shape) != info["shape"]:
            raise MergeError(f"{name}: base shape {tuple(b_ck.meta(name).shape)} differs from the set's {tuple(info['shape'])}")

    def out_dtype(name):
        info = art.tensors[name]
        if not info["merged"]:
            return b_ck.meta(name).dtype
        return DTYPES[dtype] if dtype else DTYPES.get(info["dtype"], torch.float32)

    def tensor(name):
        b = b_ck.get(name)
        if not art.tensors[name]["merged"]:
            return b
        return art.rebuild(name, t, b).to(out_dtype(name))

    if out is None:
        return {name: tensor(name) for name in art.tensors}

    out = Path(out).resolve()
    single = out.suffix == ".safetensors"
    if single:
        if out.exists() and (out.is_dir() or not overwrite):
            raise MergeError(f"output {out} exists; pass --overwrite to replace it")
        if not out.parent.exists():
            raise MergeError(f"parent folder of {out} does not exist")
    else:
        check_output_dir(out, overwrite)
    size = (1 << 62) if single else parse_size(shard_size)
    tmp = out.parent / f".{out.name}.mergesmith-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = None
    try:
        entries = {name: (tuple(info["shape"]), out_dtype(name)) for name, info in art.tensors.items()}
        writer = ShardedWriter(tmp, entries, size, metadata={"mergesmith_extract": art.tasks[t]["name"]})
        for name in art.tensors:
            writer.write(name, tensor(name))
        writer.close()
        if single:
            os.replace(tmp / "model.safetensors", out)
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if b_ck.folder is not None:
            for f in ("config.json",) + tuple(TOKENIZER_FILES):
                if (b_ck.folder / f).exists():
                    shutil.copyfile(b_ck.folder / f, tmp / f)
        info = {"extracted_from": str(Path(artefact).resolve()), "task": art.tasks[t], "method": art.manifest["method"],
                "base": b_ck.identity()}
        (tmp / "mergesmith_provenance.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        _replace(tmp, out, overwrite)
        return out
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
