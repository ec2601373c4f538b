"""mergekit's ``modules:`` form: a multi-module model (a VLM's text decoder, vision tower and projector; T5's
or Whisper's encoder and decoder) merged module by module, each with its own ``models`` and ``parameters``;
``merge_method``, ``base_model``, dtypes and the tokenizer are shared.

mergekit takes a module's tensors from its architecture files; here a module name maps to the tensor-name
parts that mark it in Hugging Face checkpoints (the names of mergekit's architecture files):

    multi_modal_projector  multi_modal_projector.*, visual.merger.*, visual.deepstack_merger_list.*, mm_projector.*
    vision_tower           vision_tower.*, vision_model.*, visual.* (the projector's tensors excepted)
    vision_model           the same (mergekit's name for Llama 4's)
    text_decoder           every other tensor of the model
    encoder / decoder      encoder.* / decoder.* (T5, Whisper's model.encoder.*, model.decoder.*)
    shared                 shared.*, lm_head.* (T5)

at the start of a name or after a dot (``model.visual.blocks.0...`` is in the vision tower). Each tensor must
belong to exactly one module of the recipe: tensors of none are a planning error (mergekit drops them, and the
output would not load). A module's ``slices:`` may only be one slice over its whole layer stack (the form
mergekit's documentation uses); frankenmerges inside modules are refused. Gradients run over each stack's own
depth (layers.stack_depths).
"""
from __future__ import annotations

from typing import Callable

from .methods.base import MergeError
from .recipe import ModelEntry, Recipe

PROJECTOR = ("multi_modal_projector.", "visual.merger.", "visual.deepstack_merger_list.", "mm_projector.")
VISION = ("vision_tower.", "vision_model.", "visual.")


def _has(name: str, parts: tuple[str, ...]) -> bool:
    return any(name.startswith(p) or f".{p}" in name for p in parts)


def _vision(name: str) -> bool:
    return _has(name, VISION) and not _has(name, PROJECTOR)


MODULES: dict[str, Callable[[str], bool]] = {
    "multi_modal_projector": lambda n: _has(n, PROJECTOR),
    "vision_tower": _vision,
    "vision_model": _vision,
    "text_decoder": lambda n: not _has(n, VISION) and not _has(n, PROJECTOR),
    "encoder": lambda n: _has(n, ("encoder.",)) and not _has(n, VISION),
    "decoder": lambda n: _has(n, ("decoder.",)) and not _has(n, VISION),
    "shared": lambda n: n.startswith(("shared.", "lm_head.")),
}


def check_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise MergeError(f"modules: unknown module '{unknown[0]}' (known: {', '.join(MODULES)})")


def module_of(tensor: str, names: list[str]) -> str | None:
    """The module of ``names`` (the recipe's) that tensor ``tensor`` belongs to; None for none. Two is an error."""
    hits = [m for m in names if MODULES[m](tensor)]
    if len(hits) > 1:
        raise MergeError(f"modules: tensor {tensor} belongs to both {hits[0]} and {hits[1]}")
    return hits[0] if hits else None


def sub_recipes(recipe: Recipe) -> list[tuple[str, Recipe, int | None]]:
    """(module name, the recipe of that module as a ``models:`` merge, the layer_range end its slice gave or
    None). A module's parameters rank above the top-level ones; a slice's above the module's."""
    check_names(list(recipe.modules))
    shared = recipe.model_dump(by_alias=True, exclude={"models", "slices", "modules", "parameters", "name"})
    out = []
    for name, mod in recipe.modules.items():
        params = {**recipe.parameters, **mod.parameters}
        base, end = recipe.base_model, None
        if mod.slices is not None:
            if len(mod.slices) != 1 or len({tuple(src.layer_range) for src in mod.slices[0].sources}) != 1 \
                    or mod.slices[0].sources[0].layer_range[0] != 0:
                raise MergeError(f"modules: {name}: slices inside a module must be one slice over the whole layer "
                                 f"stack (layer_range [0, depth] for every source); frankenmerges of one module "
                                 f"are not supported")
            sl = mod.slices[0]
            params.update(sl.parameters)
            base = sl.base_model or base
            end = sl.sources[0].layer_range[1]
            entries = [ModelEntry(model=src.model, parameters=src.parameters) for src in sl.sources]
        else:
            entries = list(mod.models)
        out.append((name, Recipe.model_validate({**shared, "base_model": base, "parameters": params,
                                                 "models": [e.model_dump() for e in entries]}), end))
    return out
