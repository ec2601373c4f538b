"""On-disk format of a compressed expert set (TALL masks or EMR-Merging).

A folder::

    manifest.json            format, method, tasks (name, source, scale), base, tensors, sizes, report
    vector/model*.safetensors one dense merged task vector per merged tensor (same names as the model)
    masks/model*.safetensors  per merged tensor: uint8 [N, ceil(numel/8)], task t's mask in row t,
                             bit-packed with numpy.packbits (big bit order) over the flattened tensor

Task t is rebuilt as theta_0 + scale_t * unpack(mask_t) * vector (scale_t = 1 for TALL). Tensors not
merged (integer buffers) are taken from the base. Both weight files are safetensors: nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..methods.base import MergeError

FORMAT = "mergesmith-compressed/1"
MANIFEST = "manifest.json"
VECTOR_DIR = "vector"
MASK_DIR = "masks"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """bool [N, ...] -> uint8 [N, ceil(numel/8)] (one bit per entry)."""
    flat = masks.reshape(masks.shape[0], -1).to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, axis=1))


def unpack_mask(packed_row: torch.Tensor, shape) -> torch.Tensor:
    """uint8 [ceil(numel/8)] -> bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = np.unpackbits(packed_row.to("cpu").numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


class Artefact:
    """A compressed expert set opened lazily (headers only until a tensor is asked for)."""

    def __init__(self, folder: str | Path):
        from ..io.checkpoint import open_checkpoint

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise MergeError(f"{folder} is not a compressed expert set (no {MANIFEST}); create one with `mergesmith compress`")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"cannot read {path}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise MergeError(f"{path}: unsupported format {self.manifest.get('format')!r} (expected {FORMAT})")
        self.tasks = self.manifest["tasks"]
        self.tensors = self.manifest["tensors"]
        self.vector = open_checkpoint(self.folder / VECTOR_DIR)
        self.masks = open_checkpoint(self.folder / MASK_DIR)
        for name, info in self.tensors.items():
            if info["merged"] and (name not in self.vector or name not in self.masks):
                raise MergeError(f"{folder}: tensor {name} is listed in the manifest but missing (incomplete copy?)")

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def task_index(self, task: int | str) -> int:
        """A task by name, or by index (an int or a string of digits that is not also a name)."""
        names = self.names
        if isinstance(task, str) and task in names:
            return names.index(task)
        try:
            i = int(task)
        except (TypeError, ValueError):
            raise MergeError(f"unknown task {task!r}; this set holds: {', '.join(names)}") from None
        if not 0 <= i < len(names):
            raise MergeError(f"task index {i} out of range 0..{len(names) - 1} (tasks: {', '.join(names)})")
        return i

    def rebuild(self, name: str, task: int, base: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s tensor ``name`` in float32, from the base tensor."""
        info = self.tensors[name]
        b = base.to(torch.float32)
        if not info["merged"]:
            return b
        vec = self.vector.get(name).to(torch.float32)
        mask = unpack_mask(self.masks.get(name)[task], info["shape"])
        scale = float(self.tasks[task].get("scale", 1.0))
        return b + scale * (mask * vec)
