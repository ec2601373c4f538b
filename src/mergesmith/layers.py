"""Resolve a tensor's transformer-block index from its name.

Covers Llama/Mistral/Qwen (`model.layers.N.`), GPT-2 (`transformer.h.N.`), BERT/ViT (`encoder.layer.N.`),
T5-like (`block.N.`), timm/others (`blocks.N.`) and CLIP (`resblocks.N.`). A model may hold several stacks
(a VLM's text layers and vision blocks, T5's encoder and decoder): :func:`layer_stack` names the one a tensor
belongs to, so a gradient runs over that stack's own depth (as mergekit's per-module layer counts do).
"""
from __future__ import annotations

import re

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block|resblocks)\.(\d+)(?:\.|$)")


def _search(name: str, pattern: str | re.Pattern | None) -> re.Match | None:
    """The block-index match in ``name``: ``pattern`` (a regex whose first group is the index) or the default."""
    rx = re.compile(pattern) if isinstance(pattern, str) else (pattern or LAYER_PATTERN)
    return rx.search(name)


def layer_index(name: str, pattern: str | re.Pattern | None = None) -> int | None:
    """Block index of tensor ``name`` or None when it lies outside the layer stack (embeddings, final
    norm, lm_head). ``pattern``: a regex whose first group is the index, overriding the default."""
    m = _search(name, pattern)
    return int(m.group(1)) if m else None


def replace_layer_index(name: str, new_index: int, pattern: str | re.Pattern | None = None) -> str:
    """``name`` with its block index replaced by ``new_index`` (used by slices/frankenmerges)."""
    m = _search(name, pattern)
    if not m:
        return name
    return name[: m.start(1)] + str(new_index) + name[m.end(1) :]


def layer_stack(name: str, pattern: str | re.Pattern | None = None) -> str | None:
    """The stack a block tensor belongs to: its name up to the block index (``model.layers.``,
    ``visual.blocks.``); None outside any stack."""
    m = _search(name, pattern)
    return name[: m.start(1)] if m else None


def stack_depths(names, pattern: str | re.Pattern | None = None) -> dict[str, int]:
    """{stack: number of blocks (largest index + 1)} over the tensor ``names`` of one checkpoint."""
    depth: dict[str, int] = {}
    for name in names:
        m = _search(name, pattern)
        if m:
            stack = name[: m.start(1)]
            depth[stack] = max(depth.get(stack, 0), int(m.group(1)) + 1)
    return depth
