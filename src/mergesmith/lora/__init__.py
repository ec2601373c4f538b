"""LoRA adapters: read PEFT adapter folders, merge them in adapter space or into their base, extract
adapters from full fine-tunes.

* :mod:`.adapter` reads a PEFT LoRA folder lazily (no peft import).
* :mod:`.combine` and :mod:`.lego` merge adapters module by module (PEFT combination types, LoRA-LEGO).
* :mod:`.write` writes a PEFT adapter folder; :mod:`.apply` gives ``base + ΔW`` as a lazy Checkpoint and
  writes full models; :mod:`.extract` does SVD extraction; :mod:`.cli` adds the commands.

This package file stays import-light (the CLI imports ``mergesmith.lora.cli`` at start-up); the public
functions are loaded on first use.
"""
from __future__ import annotations

_EXPORTS = {
    "open_adapter": "adapter",
    "LoraAdapter": "adapter",
    "merge_adapters": "merge",
    "merge_adapters_into_base": "merge",
    "open_model_with_adapter": "apply",
    "extract_lora": "extract",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
