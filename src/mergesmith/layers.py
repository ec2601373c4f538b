"""Resolve a tensor's transformer-block index from its name.

Covers Llama/Mistral/Qwen (`model.layers.N.`), GPT-2 (`transformer.h.N.`), BERT/ViT (`encoder.layer.N.`),
T5-like (`block.N.`), timm/others (`blocks.N.`) and CLIP (`resblocks.N.`).
"""
from __future__ import annotations

import re

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block|resblocks)\.(\d+)(?:\.|$)")


def layer_index(name: str, pattern: str | re.Pattern | None = None) -> int | None:
    """Block index of tensor ``name`` or None when it lies outside the layer stack (embeddings, final
    norm, lm_head). ``pattern``: a regex whose first group is the index, overriding the default."""
    rx = re.compile(pattern) if isinstance(pattern, str) else (pattern or LAYER_PATTERN)
    m = rx.search(name)
    return int(m.group(1)) if m else None


def replace_layer_index(name: str, new_index: int, pattern: str | re.Pattern | None = None) -> str:
    """``name`` with its block index replaced by ``new_index`` (used by slices/frankenmerges)."""
    rx = re.compile(pattern) if isinstance(pattern, str) else (pattern or LAYER_PATTERN)
    m = rx.search(name)
    if not m:
        return name
    return name[: m.start(1)] + str(new_index) + name[m.end(1) :]
