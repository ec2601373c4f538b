"""Tensor names of one model in two layouts: vision-language checkpoints written before and after transformers
moved the text model under ``model.`` (LLaVA, Gemma 3, Mistral 3, PaliGemma: ``language_model.model.X`` /
``vision_tower.X`` / ``multi_modal_projector.X`` became ``model.language_model.X`` / ``model.vision_tower.X`` /
``model.multi_modal_projector.X``, ``language_model.lm_head`` became ``lm_head``; Qwen2-VL / Qwen2.5-VL:
``model.X`` / ``visual.X`` became ``model.language_model.X`` / ``model.visual.X``). Fine-tunes of one base are
found in both (transformers reads either), so an input of the other layout is matched by the name's
:func:`canonical` form; the output keeps the reference input's names. Only checkpoints whose config has a
``vision_config`` are renamed: a text-only model's ``model.layers`` never matches a VLM's text layers.
"""
from __future__ import annotations

import re
import weakref

_RULES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\."), "model.language_model."),
    (re.compile(r"^(vision_tower|multi_modal_projector|visual|vision_model)\."), r"model.\1."),
    (re.compile(r"^model\.(?!(language_model|vision_tower|multi_modal_projector|visual|vision_model)\.)"),
     "model.language_model."),
)


def canonical(name: str) -> str:
    """The current-layout form of a VLM tensor name (names already in it are unchanged)."""
    for rx, repl in _RULES:
        if rx.match(name):
            return rx.sub(repl, name, count=1)
    return name


def is_vlm(config: dict | None) -> bool:
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


_INDEX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # checkpoint -> {canonical name: stored name}


def stored_name(ck, name: str) -> str | None:
    """The name under which VLM checkpoint ``ck`` stores the tensor ``name`` has in the other layout; None when
    ``ck`` is no VLM or has no such tensor. Its names' canonical forms are made once per checkpoint."""
    if not is_vlm(ck.config):
        return None
    idx = _INDEX.get(ck)
    if idx is None:
        idx = _INDEX[ck] = {canonical(n): n for n in ck.keys()}
    return idx.get(canonical(name))
