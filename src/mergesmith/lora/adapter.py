"""Read a PEFT LoRA adapter folder lazily, without importing peft.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``, read
with ``torch.load(weights_only=True)``). PEFT (Mangrulkar et al., huggingface/peft, ``tuners/lora``)
stores, for a module ``M`` of the model,

* Linear / GPT-2 Conv1D / ConvNd: ``base_model.model.M.lora_A.weight`` (r x in, or r x in x k...) and
  ``base_model.model.M.lora_B.weight`` (out x r [x 1...]); ``lora_B.bias`` when ``lora_bias=True``;
* Embedding: ``base_model.model.M.lora_embedding_A`` (r x num_embeddings) and ``..._B`` (dim x r);
* ``modules_to_save`` copies and embedding ``base_layer`` weights as full tensors (they *replace* the
  base tensor when the adapter is loaded).

The update of module M is ``ΔW = s · B A`` with ``s = alpha / r`` (Hu et al., LoRA, ICLR 2022,
arXiv 2106.09685) or ``s = alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, arXiv 2312.03732); ``r`` and
``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module name (PEFT's
``get_pattern_key``: first key K with ``re.match(r"(.*\\.)?(K)$", name)``), else ``r`` / ``lora_alpha``.
``lora_bias`` adds ``s · b`` to the module's bias.

In *adapter orientation* ΔW is ``out x in_flat``; the base weight is that (Linear), its transpose
(Conv1D with ``fan_in_fan_out``, Embedding) or a reshape (ConvNd): see :mod:`.apply`.

Unsupported, refused with a MergeError: DoRA, QALoRA, aLoRA, LoRA on raw parameters
(``target_parameters``), trainable tokens, layer replication, Megatron layers, grouped convolutions, and
initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) unless converted.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..methods.base import MergeError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

# config field -> why it cannot be merged as a plain low-rank weight update
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora) rescale each column by a learned magnitude; ΔW is not s·BA",
    "use_qalora": "QALoRA adapters (use_qalora) pool their inputs; ΔW is not s·BA",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only acts after invocation tokens and cannot be merged",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable-token adapters are not supported",
    "layer_replication": "layer_replication changes the model's layers and is not supported",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA adapters are not supported",
    "velora_config": "VeLoRA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
    "arrow_config": "Arrow routing adapters are not supported",
    "lora_ga_config": "LoRA-GA initialisation changes the base weights; convert the adapter first",
    "corda_config": "CorDA initialisation changes the base weights; convert the adapter first",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_key(patterns, name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern K with ``re.match(r"(.*\\.)?(K)$", name)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


@dataclass
class LoraModule:
    """One adapted module. Shapes are those stored in the file."""

    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" (nn.Linear or GPT-2 Conv1D), "embedding" or "conv"
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    a_shape: tuple
    b_shape: tuple
    bias_key: str | None = None

    @property
    def in_features(self) -> int:
        return math.prod(self.a_shape[1:])

    @property
    def out_features(self) -> int:
        return self.b_shape[0]

    @property
    def layout(self) -> tuple[str, tuple, tuple]:
        """(kind, A's trailing shape, B's trailing shape): what two adapters must share to be merged."""
        return self.kind, tuple(self.a_shape[1:]), (self.b_shape[0],) + tuple(self.b_shape[2:])


@dataclass
class Factors:
    """Unscaled factors in adapter orientation: A (r x in_flat), B (out x r), float32; ΔW = scale·B A."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None  # lora_B.bias, unscaled

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily: config and safetensors header at open, tensors on use."""

    def __init__(self, folder: Path, config: dict, weights: Path):
        self.folder = folder
        self.config = config
        self.weights = weights
        self.label = str(folder)
        self.rslora = bool(config.get("use_rslora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.base_model = config.get("base_model_name_or_path")
        self._lock = threading.Lock()
        self._handle = None
        self._memory: dict[str, torch.Tensor] | None = None
        shapes, dtypes = self._read_shapes()
        self.shapes = shapes
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key (full tensors)
        self._parse(shapes)
        first = next(iter(self.modules.values()))
        self.dtype = dtypes[first.a_key]  # dtype of the LoRA factors as stored

    # -- reading ------------------------------------------------------------------------------------
    def _read_shapes(self) -> tuple[dict[str, tuple], dict[str, torch.dtype]]:
        if self.weights.suffix == ".safetensors":
            from ..io.checkpoint import read_safetensors_header

            metas, *_ = read_safetensors_header(self.weights)
            return {k: m.shape for k, m in metas.items()}, {k: m.dtype for k, m in metas.items()}
        try:
            sd = torch.load(str(self.weights), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a user error
            raise MergeError(f"cannot read {self.weights} with torch.load(weights_only=True): {str(e).splitlines()[0]}") from None
        if not isinstance(sd, dict):
            raise MergeError(f"{self.weights} does not hold a state dict")
        self._memory = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return {k: tuple(v.shape) for k, v in self._memory.items()}, {k: v.dtype for k, v in self._memory.items()}

    def tensor(self, key: str) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[key]
        with self._lock:
            if self._handle is None:
                from safetensors import safe_open

                self._handle = safe_open(str(self.weights), framework="pt", device="cpu")
            return self._handle.get_tensor(key)

    # -- parsing ------------------------------------------------------------------------------------
    def _parse(self, shapes: dict[str, tuple]) -> None:
        found: dict[str, dict[str, str]] = {}
        adapter_names = set()
        for key in shapes:
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            parts = name.split(".")
            idx = [i for i, p in enumerate(parts) if p.startswith("lora_") or p.startswith("trainable_tokens")]
            if not idx:
                if "original_module" in parts:  # modules_to_save's untrained copy (newer PEFT saves it too)
                    continue
                target = _replacement_target(name)
                # a modules_to_save copy (trained) wins over the resized embedding layer PEFT also saves in full
                if target not in self.replacements or "modules_to_save" in parts:
                    self.replacements[target] = key
                continue
            i = idx[-1]
            part, module, rest = parts[i], ".".join(parts[:i]), parts[i + 1:]
            if part not in _PARTS:
                what = "DoRA (lora_magnitude_vector)" if part == "lora_magnitude_vector" else part
                raise MergeError(f"{self.label}: tensor '{key}' is {what}, which mergesmith cannot merge (only plain LoRA A/B factors)")
            if part.startswith("lora_embedding"):
                leaf = "weight"
                if len(rest) > 1:
                    raise MergeError(f"{self.label}: unexpected tensor name '{key}'")
                adapter_names.update(rest)
            else:
                if not rest or rest[-1] not in ("weight", "bias") or len(rest) > 2:
                    raise MergeError(f"{self.label}: unexpected tensor name '{key}'")
                leaf = rest[-1]
                adapter_names.update(rest[:-1])
            if leaf == "bias" and part != "lora_B":
                raise MergeError(f"{self.label}: unexpected tensor name '{key}'")
            slot = {"lora_A": "A", "lora_embedding_A": "A", "lora_B": "B", "lora_embedding_B": "B"}[part]
            slot = "bias" if leaf == "bias" else slot
            entry = found.setdefault(module, {})
            entry["kind"] = "embedding" if part.startswith("lora_embedding") else "linear"
            entry[slot] = key
        if len(adapter_names) > 1:
            raise MergeError(f"{self.label}: the file holds several adapters ({', '.join(sorted(adapter_names))}); save one adapter per folder")
        if not found:
            raise MergeError(f"{self.label}: no LoRA tensors (lora_A/lora_B) in {self.weights.name}")
        cfg = self.config
        for module, entry in sorted(found.items()):
            if "A" not in entry or "B" not in entry:
                raise MergeError(f"{self.label}: module '{module}' has only one of its LoRA factors (corrupt adapter)")
            a_shape, b_shape = tuple(shapes[entry["A"]]), tuple(shapes[entry["B"]])
            kind = entry["kind"]
            if kind == "linear" and len(a_shape) > 2:
                kind = "conv"
                if len(b_shape) != len(a_shape) or any(s != 1 for s in b_shape[2:]):
                    raise MergeError(f"{self.label}: module '{module}': unsupported convolution LoRA layout {a_shape} / {b_shape}")
            elif len(a_shape) != 2 or len(b_shape) != 2:
                raise MergeError(f"{self.label}: module '{module}': LoRA factors must be matrices, got {a_shape} / {b_shape}")
            r = a_shape[0]
            if b_shape[1] != r:
                why = " (grouped convolutions are not supported)" if kind == "conv" else ""
                raise MergeError(f"{self.label}: module '{module}': lora_A has rank {r} but lora_B has {b_shape[1]} columns{why}")
            rk = pattern_key((cfg.get("rank_pattern") or {}).keys(), module)
            ak = pattern_key((cfg.get("alpha_pattern") or {}).keys(), module)
            r_cfg = int(cfg["rank_pattern"][rk]) if rk is not None else int(cfg.get("r", r))
            alpha = float(cfg["alpha_pattern"][ak]) if ak is not None else float(cfg.get("lora_alpha", r_cfg))
            if r_cfg != r:
                raise MergeError(f"{self.label}: module '{module}' has rank {r} in the file but {r_cfg} in adapter_config.json (corrupt adapter)")
            self.modules[module] = LoraModule(
                module, kind, r, alpha, lora_scale(alpha, r, self.rslora), entry["A"], entry["B"], a_shape, b_shape,
                entry.get("bias"),
            )

    # -- tensors ------------------------------------------------------------------------------------
    def factors(self, module: str) -> Factors:
        """The module's factors in adapter orientation, float32."""
        m = self.modules[module]
        A = self.tensor(m.a_key).to(torch.float32).reshape(m.rank, -1)
        B = self.tensor(m.b_key).to(torch.float32).reshape(m.out_features, m.rank)
        bias = self.tensor(m.bias_key).to(torch.float32) if m.bias_key else None
        return Factors(A, B, m.scale, bias)

    def replacement(self, target: str) -> torch.Tensor:
        return self.tensor(self.replacements[target])

    def identity(self) -> dict:
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            h.update(f.read(1 << 20))
        return {
            "adapter": self.label,
            "config_sha256": hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest(),
            "file": self.weights.name,
            "bytes": self.weights.stat().st_size,
            "head_sha256": h.hexdigest(),
        }


def _replacement_target(name: str) -> str:
    """Base tensor name of a full tensor stored in an adapter (modules_to_save copy, base_layer, or a resized
    embedding layer saved whole)."""
    parts = name.split(".")
    if "modules_to_save" in parts:  # M.modules_to_save.<adapter>.weight, or M.modules_to_save.weight (newer PEFT)
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + (2 if len(parts) - i > 2 else 1):]
    return ".".join(p for p in parts if p != "base_layer")


def check_config(config: dict, label: str) -> None:
    """Refuse adapters whose update is not a plain s·BA (one clear line each)."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeError(f"{label} is a {peft_type} adapter; only LoRA adapters (peft_type LORA) are supported")
    for key, why in _REFUSED.items():
        if config.get(key):
            raise MergeError(f"{label}: {why}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise MergeError(
            f"{label}: init_lora_weights={init!r} changes the base weights, so the adapter is not relative to "
            "the base model; convert it to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)"
        )


def is_adapter_folder(path) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / CONFIG_NAME).exists()


def open_adapter(ref) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (or its adapter_model.* file); raises MergeError with the fix."""
    if isinstance(ref, LoraAdapter):
        return ref
    from ..io.hub_cache import local_path

    path = local_path(str(ref))  # a repo id opens from the local Hugging Face cache
    if path.is_file() and path.name.startswith("adapter_model"):
        path = path.parent
    if not path.exists():
        raise MergeError(f"adapter not found: {ref} (give a local PEFT adapter folder or a repo id already in the Hugging Face cache)")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise MergeError(f"{ref} is not a PEFT adapter folder: no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(config, dict):
        raise MergeError(f"{cfg_path} is not a JSON object")
    check_config(config, str(ref))
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).exists():
            return LoraAdapter(path, config, path / name)
    raise MergeError(f"{ref}: no adapter_model.safetensors or adapter_model.bin")
