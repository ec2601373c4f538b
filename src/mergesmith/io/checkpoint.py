"""Read checkpoints lazily: headers first (names, shapes, dtypes), tensor data only when asked.

Supported inputs: a Hugging Face folder (sharded safetensors + index, single safetensors, or
``pytorch_model*.bin`` read with ``torch.load(weights_only=True)``), a single ``.safetensors`` or
``.bin``/``.pt`` file, an in-memory state dict, or an ``nn.Module``. Pickles are never unpickled
beyond what ``weights_only=True`` allows.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..methods.base import MergeError
from . import buffers

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict, bytes, dict[str, tuple[int, int]]]:
    """Parse a safetensors header without touching tensor data.

    Returns (metas, metadata, raw header bytes, absolute byte range of each tensor in the file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
        header = json.loads(raw)
        metas = {}
        offsets: dict[str, tuple[int, int]] = {}
        data_len = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if end > data_len or begin > end:
                raise ValueError(f"tensor {name} lies past the end of the file (truncated download?)")
            meta = TensorMeta(tuple(int(s) for s in info["shape"]), dtype)
            if end - begin != meta.numel * torch.empty((), dtype=dtype).element_size():
                raise ValueError(f"tensor {name}: byte range does not match its shape and dtype")
            metas[name] = meta
            offsets[name] = (8 + n + begin, 8 + n + end)
        return metas, header.get("__metadata__") or {}, raw, offsets
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise MergeError(f"corrupt or unreadable safetensors file {path}: {e}") from None


class Checkpoint:
    """A lazily read set of named tensors plus (for HF folders) its config."""

    def __init__(self, label: str):
        self.label = label
        self.metas: dict[str, TensorMeta] = {}
        self.config: dict | None = None
        self.folder: Path | None = None

    def keys(self) -> list[str]:
        return list(self.metas)

    def __contains__(self, name: str) -> bool:
        return name in self.metas

    def meta(self, name: str) -> TensorMeta:
        return self.metas[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        """Provenance: files with sizes and header hashes."""
        return {"source": self.label}

    def close(self) -> None:
        pass


class SafetensorsCheckpoint(Checkpoint):
    """Safetensors files read with positioned reads (``os.pread``) of exactly the bytes asked for.

    No memory map: resident memory holds only the tensors (or row chunks) the engine is using, and
    reads are thread-safe without per-thread handles."""

    def __init__(self, label: str, files: list[Path], weight_map: dict[str, str] | None = None):
        super().__init__(label)
        self.files = files
        self.file_of: dict[str, Path] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        self.header_hash: dict[str, str] = {}
        for f in files:
            metas, _, raw, offsets = read_safetensors_header(f)
            self.header_hash[f.name] = hashlib.sha256(raw).hexdigest()
            for k, m in metas.items():
                self.metas[k] = m
                self.file_of[k] = f
                self.ranges[k] = offsets[k]
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.metas]
            if missing:
                raise MergeError(
                    f"{label}: index lists tensor '{missing[0]}' that is not in {weight_map[missing[0]]} (corrupt or incomplete download)"
                )
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        meta = self.metas[name]
        begin, end = self.ranges[name]
        shape = meta.shape
        if rows is not None and len(shape) >= 1:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            a, b = max(0, rows[0]), min(shape[0], rows[1])
            begin, end = begin + a * row_bytes, begin + b * row_bytes
            shape = (b - a,) + tuple(shape[1:])
        n = end - begin
        raw = buffers.empty((n,), torch.uint8)  # not zero-filled (unlike bytearray), reused when free
        view = memoryview(raw.numpy()) if n else memoryview(b"")
        fd = self._fd(self.file_of[name])
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], begin + got)
            if k <= 0:
                raise MergeError(f"{self.file_of[name]}: unexpected end of file while reading {name}")
            got += k
        if n == 0:
            return torch.empty(shape, dtype=meta.dtype)
        return raw.view(meta.dtype).reshape(shape)

    def identity(self) -> dict:
        return {
            "source": self.label,
            "files": [
                {"name": f.name, "bytes": f.stat().st_size, "header_sha256": self.header_hash[f.name]}
                for f in self.files
            ],
        }

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class MemoryCheckpoint(Checkpoint):
    def __init__(self, label: str, tensors: Mapping[str, torch.Tensor], config: dict | None = None):
        super().__init__(label)
        self.tensors = {k: v.detach() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self.tensors.items()}
        self.config = config

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if rows is None or t.dim() == 0:
            return t
        return t[rows[0] : rows[1]]


class TorchBinCheckpoint(MemoryCheckpoint):
    """``.bin``/``.pt`` files, loaded with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, label: str, files: list[Path]):
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be mmapped
                    sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a user-facing error
                raise MergeError(f"cannot read {f} with torch.load(weights_only=True): {str(e).splitlines()[0]}") from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise MergeError(f"{f} does not hold a state dict")
            tensors.update(sd)
        super().__init__(label, tensors)
        self.files = files

    def identity(self) -> dict:
        out = []
        for f in self.files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
            out.append({"name": f.name, "bytes": f.stat().st_size, "head_sha256": h.hexdigest()})
        return {"source": self.label, "files": out}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"cannot read {path}: {e}") from None


def open_folder_or_file(ref: str | os.PathLike) -> Checkpoint:
    from .hub_cache import local_path

    path = local_path(str(ref))  # a repo id (org/name[@rev]) opens from the local Hugging Face cache
    if not path.exists():
        raise MergeError(f"model not found: {ref} (give a local folder or file, or a repo id already in the "
                         f"Hugging Face cache; downloads are not done at merge time)")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(str(ref), [path])
        if path.suffix in (".bin", ".pt", ".pth"):
            return TorchBinCheckpoint(str(ref), [path])
        raise MergeError(f"unsupported checkpoint file {path} (expected .safetensors, .bin or .pt)")
    ckpt: Checkpoint
    st_index = path / "model.safetensors.index.json"
    bin_index = path / "pytorch_model.bin.index.json"
    if st_index.exists():
        wm = _read_json(st_index).get("weight_map", {})
        files = sorted({path / v for v in wm.values()})
        for f in files:
            if not f.exists():
                raise MergeError(f"{ref}: shard {f.name} listed in the index is missing")
        ckpt = SafetensorsCheckpoint(str(ref), files, wm)
    elif (path / "model.safetensors").exists():
        ckpt = SafetensorsCheckpoint(str(ref), [path / "model.safetensors"])
    elif sorted(path.glob("*.safetensors")) and not (path / "adapter_config.json").exists():
        files = sorted(path.glob("*.safetensors"))
        # Mistral's repos also hold consolidated.safetensors (the same weights under mistral-inference names)
        files = [f for f in files if not f.name.startswith("consolidated")] or files
        ckpt = SafetensorsCheckpoint(str(ref), files)
    elif bin_index.exists():
        wm = _read_json(bin_index).get("weight_map", {})
        ckpt = TorchBinCheckpoint(str(ref), sorted({path / v for v in wm.values()}))
    elif (path / "pytorch_model.bin").exists():
        ckpt = TorchBinCheckpoint(str(ref), [path / "pytorch_model.bin"])
    elif (path / "adapter_config.json").exists():
        raise MergeError(
            f"{ref} is a PEFT LoRA adapter, not a model: give it as 'BASE+{ref}' (base model folder + adapter folder)"
        )
    else:
        raise MergeError(f"no weights found in {ref} (expected *.safetensors or pytorch_model*.bin)")
    if (path / "config.json").exists():
        ckpt.config = _read_json(path / "config.json")
    ckpt.folder = path
    return ckpt


def open_checkpoint(ref: Any, label: str | None = None, base: Any = None) -> Checkpoint:
    """Open any supported input: path, ``model+adapter`` string, state dict, nn.Module or Checkpoint.
    With ``base`` (a recipe's base_model), a bare PEFT adapter folder opens as ``base+adapter``."""
    if isinstance(ref, Checkpoint):
        return ref
    if isinstance(ref, torch.nn.Module):
        cfg = getattr(ref, "config", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        return MemoryCheckpoint(label or type(ref).__name__, ref.state_dict(), cfg)
    if isinstance(ref, Mapping):
        return MemoryCheckpoint(label or "state_dict", ref)
    from .hub_cache import local_path

    ref_s = str(ref)
    if "+" in ref_s and not Path(ref_s).expanduser().exists():
        model, adapter = ref_s.split("+", 1)
        try:
            from ..lora.apply import open_model_with_adapter
        except ImportError:
            raise MergeError(f"'{ref_s}': model+adapter inputs need mergesmith.lora") from None
        return open_model_with_adapter(model, adapter)
    if base is not None and (local_path(ref_s) / "adapter_config.json").is_file():
        from ..lora.apply import open_model_with_adapter

        return open_model_with_adapter(base, ref_s)
    return open_folder_or_file(ref_s)
