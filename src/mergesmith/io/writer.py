"""Streaming sharded safetensors writer.

The planner knows every output tensor's name, shape and dtype before any weight is read, so the
writer lays out all shards and their headers up front and then writes each finished tensor straight
to its offset (``os.pwrite``). No shard is ever buffered in RAM: memory does not grow with shard size,
and tensors may be finished in any order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import DTYPE_TO_SAFETENSORS


@dataclass
class _Slot:
    file: str
    offset: int  # absolute offset in the file
    nbytes: int


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'400MB', '2GB', '5B' (=5e9 bytes, mergekit style), '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u) and s[: -len(u)].replace(".", "", 1).isdigit():
            return int(float(s[: -len(u)]) * units[u])
    if s.isdigit():
        return int(s)
    raise ValueError(f"cannot parse size {text!r} (use e.g. 400MB, 2GB)")


class ShardedWriter:
    """Writes ``entries`` (name -> (shape, dtype)) into shards of at most ``shard_size`` bytes in
    ``folder``. Single shard: ``model.safetensors``; several: ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Call :meth:`write` once per tensor, then :meth:`close`."""

    def __init__(self, folder: Path, entries: dict[str, tuple[tuple, torch.dtype]], shard_size: int,
                 metadata: dict[str, str] | None = None, prefix: str = "model"):
        self.folder = Path(folder)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in entries.items():
            nb = _nbytes(shape, dtype)
            if shards[-1] and size + nb > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nb
        n = len(shards)
        self.file_names = [f"{prefix}.safetensors"] if n == 1 else [
            f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.slots: dict[str, _Slot] = {}
        self.fds: dict[str, int] = {}
        self.total_bytes = 0
        for fname, names in zip(self.file_names, shards):
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            off = 0
            for name in names:
                shape, dtype = entries[name]
                nb = _nbytes(shape, dtype)
                header[name] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * ((8 - len(raw) % 8) % 8)
            base = 8 + len(raw)
            path = self.folder / fname
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, len(raw).to_bytes(8, "little") + raw)
            os.ftruncate(fd, base + off)
            self.fds[fname] = fd
            for name in names:
                b, e = header[name]["data_offsets"]
                self.slots[name] = _Slot(fname, base + b, e - b)
            self.total_bytes += off
        self.weight_map = {name: slot.file for name, slot in self.slots.items()}
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor, row_offset_bytes: int = 0) -> None:
        """Write ``tensor`` (already in the planned dtype, on CPU) at its slot; ``row_offset_bytes`` lets
        the engine write row chunks of one tensor."""
        slot = self.slots[name]
        t = tensor.detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        nb = len(data) if isinstance(data, bytes) else data.nbytes
        if row_offset_bytes + nb > slot.nbytes:
            raise RuntimeError(f"writer: {name} overflows its planned size")
        fd = self.fds[slot.file]
        mv = memoryview(data) if not isinstance(data, bytes) else data
        pos = slot.offset + row_offset_bytes
        while len(mv):
            n = os.pwrite(fd, mv, pos)
            mv = mv[n:]
            pos += n
        if row_offset_bytes + nb == slot.nbytes:
            self.written.add(name)

    def patch(self, name: str, offset: int, idx, values: torch.Tensor) -> None:
        """Overwrite elements ``offset + idx`` (flat, sorted or not) of a written tensor with ``values``
        (its dtype): one read-modify-write of the byte range they span."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        slot = self.slots[name]
        item = values.element_size()
        lo, hi = int(idx.min()), int(idx.max()) + 1
        pos = slot.offset + (offset + lo) * item
        if (offset + hi) * item > slot.nbytes:
            raise RuntimeError(f"writer: patch of {name} outside its slot")
        fd = self.fds[slot.file]
        n = (hi - lo) * item
        buf = bytearray(n)
        got = 0
        while got < n:
            k = os.preadv(fd, [memoryview(buf)[got:]], pos + got)
            if k <= 0:
                raise RuntimeError(f"writer: short read while patching {name}")
            got += k
        region = np.frombuffer(buf, dtype=np.uint8).reshape(-1, item)
        region[idx - lo] = values.contiguous().reshape(-1).view(torch.uint8).numpy().reshape(-1, item)
        mv = memoryview(buf)
        while len(mv):
            k = os.pwrite(fd, mv, pos)
            mv, pos = mv[k:], pos + k

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
