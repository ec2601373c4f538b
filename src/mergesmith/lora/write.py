"""Write a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads unchanged, and the
staging helpers every lora command uses (write to a temporary folder beside the target, rename at the end).

The written adapter has scaling exactly 1 in every module: ``lora_alpha = r`` (plus ``alpha_pattern`` =
``rank_pattern`` for modules whose rank differs from the most common one) and ``use_rslora = false``,
whatever the inputs used, so no source scaling can be applied twice.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..methods.base import MergeError
from .adapter import CONFIG_NAME, PREFIX


@dataclass
class OutModule:
    """One module of an adapter to write: 2-D factors (A r x in_flat, B out x r, scaling 1) plus the
    trailing shapes that turn them back into PEFT's layout (conv kernels)."""

    name: str
    kind: str  # linear | embedding | conv
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None
    a_tail: tuple = ()  # A's shape after the rank, for conv: (in, k1, k2)
    b_tail: tuple = ()  # B's shape after (out, r), for conv: (1, 1)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        r = self.rank
        A = self.A.reshape((r,) + tuple(self.a_tail)) if self.a_tail else self.A
        B = self.B.reshape((self.B.shape[0], r) + tuple(self.b_tail)) if self.b_tail else self.B
        key = f"{PREFIX}{self.name}"
        if self.kind == "embedding":
            out = {f"{key}.lora_embedding_A": A, f"{key}.lora_embedding_B": B}
        else:
            out = {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
            if self.bias is not None:
                out[f"{key}.lora_B.bias"] = self.bias
        return {k: v.to(dtype).contiguous() for k, v in out.items()}


def check_output(out, overwrite: bool) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite`` (checked before any work)."""
    from ..io.atomic import check_output_dir

    out = Path(out).expanduser().resolve()
    check_output_dir(out, overwrite)
    return out


def staging(out, overwrite: bool = False):
    """Yield a temporary folder beside ``out`` that replaces it on success (see io.atomic)."""
    from ..io.atomic import staging as atomic_staging

    out = check_output(out, overwrite)
    return atomic_staging(out, overwrite, check=False)


def adapter_config(modules: list[OutModule], *, base_model: str | None, target_modules: list[str],
                   modules_to_save: list[str] | None = None, fan_in_fan_out: bool = False,
                   task_type: str | None = None, bias: str = "none") -> dict:
    """A LoRA adapter_config.json for ``modules`` with scaling 1 in every module."""
    if any(m.bias is not None for m in modules) and any(m.kind == "embedding" for m in modules):
        raise MergeError("the result would have lora_bias and an embedding LoRA, which PEFT cannot load; "
                         "merge the embedding adapters separately")
    ranks = Counter(m.rank for m in modules)
    r = max(ranks, key=lambda k: (ranks[k], k)) if ranks else 8
    pattern = {m.name: m.rank for m in modules if m.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": int(r),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": any(m.bias is not None for m in modules),
        "bias": bias,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "target_modules": target_modules,
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def write_adapter(folder: Path, modules: list[OutModule], config: dict, *, dtype: torch.dtype = torch.float32,
                  extra_tensors: dict[str, torch.Tensor] | None = None, readme: str = "") -> None:
    """Write adapter_model.safetensors, adapter_config.json and README.md into ``folder`` (which exists)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        tensors.update(m.tensors(dtype))
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.contiguous()
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (Path(folder) / "README.md").write_text(readme or adapter_card(config, ""))


def adapter_card(config: dict, body: str) -> str:
    """A short model card with front matter for a LoRA adapter."""
    lines = ["---", "library_name: peft", "tags:", "- mergesmith", "- lora"]
    base = config.get("base_model_name_or_path")
    if base and not Path(str(base)).exists():
        lines.append(f"base_model: {base}")
    lines += ["---", "", "# LoRA adapter (mergesmith)", ""]
    if base:
        lines.append(f"Base model: `{base}`.")
    lines.append(f"Rank {config['r']} (scaling 1: lora_alpha = r), {len(config.get('rank_pattern') or {})} module(s) with another rank.")
    lines.append("")
    lines.append("Load with `peft.PeftModel.from_pretrained(base_model, this_folder)`.")
    if body:
        lines += ["", body.rstrip()]
    return "\n".join(lines) + "\n"
