"""Base model + LoRA adapter(s) as one lazy Checkpoint.

``open_model_with_adapter("base/", "adapter/")`` (also reached through ``open_checkpoint("base/+adapter/")``
and recipes' ``model+adapter`` references) returns a Checkpoint whose ``get(name)`` is
``W0 + s · B A`` for adapted modules, computed in float32 when the tensor is read and cast back to the
base dtype (what PEFT's ``merge_and_unload`` gives). Several adapters (``base+a1+a2``, or
:func:`~.merge.merge_adapters_into_base`) are combined with a method of :mod:`.combine` *without* the
final SVD truncation (into-base merges keep the dense merged ΔW).

The adapter-orientation ΔW (out x in_flat) maps onto the base weight as: itself (nn.Linear), its
transpose (GPT-2 Conv1D, whose weight is in x out: decided by shape, ``fan_in_fan_out`` breaks the tie
for square weights; Embedding, whose LoRA is stored transposed), or a reshape (ConvNd).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..io.checkpoint import Checkpoint, TensorMeta, open_checkpoint
from ..methods.base import MergeError
from .adapter import LoraAdapter, open_adapter
from .combine import CombineOptions, applied_delta, merged_bias, pick_replacement


def resolve_name(name: str, keys, what: str, label: str) -> str:
    """The base tensor matching an adapter's tensor name: exact, else the unique key that ends with it or
    that it ends with (adapters trained on ``LlamaModel`` vs checkpoints of ``LlamaForCausalLM``)."""
    if name in keys:
        return name
    hits = [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    why = "several" if hits else "no"
    raise MergeError(f"{label}: {what} '{name}' matches {why} tensor(s) of the base model (is this adapter for another model?)")


def weight_layout(mod, shape: tuple, fan_in_fan_out: bool, label: str) -> str:
    """How the module's adapter-orientation ΔW maps onto a base weight of ``shape``: same | T | reshape."""
    out, inn = mod.out_features, mod.in_features
    if mod.kind == "conv":
        if tuple(shape) == (out,) + tuple(mod.a_shape[1:]):
            return "reshape"
    elif mod.kind == "embedding":
        if tuple(shape) == (inn, out):
            return "T"
    else:
        normal, flipped = tuple(shape) == (out, inn), tuple(shape) == (inn, out)
        if normal and flipped:
            return "T" if fan_in_fan_out else "same"
        if normal:
            return "same"
        if flipped:
            return "T"
    raise MergeError(
        f"{label}: module '{mod.name}' (LoRA {mod.kind}, in {inn}, out {out}) does not fit the base weight of shape {list(shape)}"
    )


class AdaptedCheckpoint(Checkpoint):
    """``base`` with the merged ΔW of ``adapters`` added on read. Full tensors the adapters carry
    (modules_to_save, embedding base layers) replace the base tensor; when several adapters carry the same
    tensor with different values, ``replace`` decides: error | first | average (weighted by w_i)."""

    def __init__(self, base: Checkpoint, adapters: list[LoraAdapter], opts: CombineOptions,
                 label: str | None = None, replace: str = "error"):
        super().__init__(label or "+".join([base.label] + [a.label for a in adapters]))
        if replace not in ("error", "first", "average"):
            raise MergeError(f"replace must be error, first or average, got {replace!r}")
        if len(opts.weights) != len(adapters):
            raise MergeError(f"{len(adapters)} adapter(s) but {len(opts.weights)} weight(s)")
        self.base, self.adapters, self.opts, self.replace = base, adapters, opts, replace
        self.config, self.folder = base.config, base.folder
        from ..io.vocab import vocabulary_fingerprint

        for a in adapters:  # an adapter saved with its own tokenizer (tokens added in training) is the vocabulary
            folder = getattr(a, "folder", None)
            if folder is not None and vocabulary_fingerprint(folder) is not None:
                self.folder = Path(folder)
        self.metas = dict(base.metas)
        keys = base.keys()
        self.replaced: dict[str, list[tuple[int, str]]] = {}
        for i, a in enumerate(adapters):
            for target in a.replacements:
                name = resolve_name(target, keys, "tensor", a.label)
                self.replaced.setdefault(name, []).append((i, target))
        for name, src in self.replaced.items():
            shapes = {tuple(adapters[j].shapes[adapters[j].replacements[t]]) for j, t in src}
            if len(shapes) > 1:
                raise MergeError(f"adapters replace '{name}' with tensors of different shapes {sorted(shapes)}")
            shape = shapes.pop()
            self.metas[name] = TensorMeta(shape, base.meta(name).dtype)
            if self.config and shape and base.meta(name).shape[1:] == shape[1:] and shape[0] != base.meta(name).shape[0] \
                    and base.meta(name).shape[0] == self.config.get("vocab_size"):  # a resized embedding / head
                self.config = {**self.config, "vocab_size": shape[0]}
        self.module_of: dict[str, tuple[str, str]] = {}  # weight name -> (module, layout)
        self.bias_of: dict[str, str] = {}
        layouts = {}
        for a in adapters:
            for m in a.modules.values():
                wname = resolve_name(f"{m.name}.weight", keys, "module weight", a.label)
                layout = weight_layout(m, self.metas[wname].shape, a.fan_in_fan_out, a.label)
                if layouts.setdefault(m.name, (wname, m.layout)) != (wname, m.layout):
                    raise MergeError(f"adapters disagree on the shape of module '{m.name}'; they are not for the same base model")
                self.module_of[wname] = (m.name, layout)
                if m.bias_key is not None:
                    bname = wname[: -len("weight")] + "bias"
                    if bname not in keys:
                        raise MergeError(f"{a.label}: module '{m.name}' has a LoRA bias (lora_bias) but the base layer has no bias")
                    self.bias_of[bname] = m.name
        self._lock = threading.Lock()
        self._cache: tuple[str, torch.Tensor] | None = None

    def _factors(self, module: str) -> list:
        return [a.factors(module) if module in a.modules else None for a in self.adapters]

    def _delta(self, name: str) -> torch.Tensor:
        module, layout = self.module_of[name]
        with self._lock:
            if self._cache is not None and self._cache[0] == name:
                return self._cache[1]
        d = applied_delta(self.opts, module, self._factors(module))
        d = d.T if layout == "T" else d.reshape(self.metas[name].shape)
        with self._lock:
            self._cache = (name, d)
        return d

    def _replacement(self, name: str) -> torch.Tensor:
        src = self.replaced[name]
        vals = [self.adapters[i].replacement(t) for i, t in src]
        return pick_replacement(name, vals, [float(self.opts.weights[i]) for i, _ in src], self.replace,
                                [self.adapters[i].label for i, _ in src])

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        meta = self.metas[name]
        if name in self.replaced:
            t = self._replacement(name)
            t = t if rows is None or t.dim() == 0 else t[rows[0]: rows[1]]
        else:
            t = self.base.get(name, rows)
        if name not in self.module_of and name not in self.bias_of and name not in self.replaced:
            return t
        t = t.to(torch.float32)
        if name in self.module_of:
            d = self._delta(name)
            t = t + (d if rows is None else d[rows[0]: rows[1]])
        if name in self.bias_of:
            b = merged_bias(self._factors(self.bias_of[name]), self.opts.weights)
            t = t + (b if rows is None else b[rows[0]: rows[1]])
        return t.to(meta.dtype)

    def identity(self) -> dict:
        return {"source": self.label, "base": self.base.identity(), "adapters": [a.identity() for a in self.adapters],
                "lora_method": self.opts.method, "weights": list(self.opts.weights)}


def open_model_with_adapter(model_ref, adapter_ref) -> AdaptedCheckpoint:
    """``model + adapter`` as a lazy Checkpoint: W0 + s·BA on adapted modules, replacements applied.
    ``adapter_ref`` may chain several adapters, ``a1+a2``: W0 + ΔW_1 + ΔW_2."""
    base = open_checkpoint(model_ref)
    refs = [adapter_ref]
    if isinstance(adapter_ref, str) and "+" in adapter_ref and not Path(adapter_ref).expanduser().exists():
        refs = adapter_ref.split("+")
    adapters = [open_adapter(r) for r in refs]
    return AdaptedCheckpoint(base, adapters, CombineOptions(method="svd", weights=[1.0] * len(adapters)),
                             label="+".join([base.label] + [a.label for a in adapters]))
