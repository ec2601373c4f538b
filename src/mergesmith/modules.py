"""mergekit's ``modules:`` form: a multi-module model (a VLM's text decoder, vision tower and projector; T5's
or Whisper's encoder and decoder) merged module by module, each with its own ``models`` and ``parameters``;
``merge_method``, ``base_model``, dtypes and the tokenizer are shared.

mergekit takes a module's tensors from its architecture files; here a module name maps to the tensor-name
parts that mark it in Hugging Face checkpoints (the names of mergekit's architecture files):

    multi_modal_projector  multi_modal_projector.*, visual.merger.*, visual.deepstack_merger_list.*, mm_projector.*,
                           connector.* (Idefics3 / SmolVLM)
    vision_tower           vision_tower.*, vision_model.*, visual.* (the projector's tensors excepted)
    vision_model           the same (mergekit's name for Llama 4's)
    text_decoder           every other tensor of the model
    encoder / decoder      encoder.* / decoder.* (T5, Whisper's model.encoder.*, model.decoder.*)
    shared                 shared.*, lm_head.* (T5)

at the start of a name or after a dot (``model.visual.blocks.0...`` is in the vision tower). Each tensor must
belong to exactly one module of the recipe: tensors of none are a planning error (mergekit drops them, and the
output would not load). A module's ``slices:`` are either one slice over its whole layer stack (the form
mergekit's documentation uses: the same merge as ``models:``) or, for the text decoder, a frankenmerge of its
layers (the config's ``text_config.num_hidden_layers`` and per-layer lists follow); other modules' stacks are
not rebuilt. Gradients run over each stack's own depth (layers.stack_depths).
"""
from __future__ import annotations

from typing import Callable

from .methods.base import MergeError
from .recipe import ModelEntry, Recipe

PROJECTOR = ("multi_modal_projector.", "visual.merger.", "visual.deepstack_merger_list.", "mm_projector.", "connector.")
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


FRANKEN = ("text_decoder", "decoder")  # modules whose stack slices may rebuild (its config key is known)


def _whole_stack(mod) -> bool:
    """One slice whose sources all start at layer 0 over the same range: mergekit's documented form, the same
    merge as ``models:`` (its end is checked against the stack's depth when planned)."""
    return len(mod.slices) == 1 and len({tuple(s.layer_range) for s in mod.slices[0].sources}) == 1 \
        and mod.slices[0].sources[0].layer_range[0] == 0


def sub_recipes(recipe: Recipe) -> list[tuple[str, Recipe, int | None]]:
    """(module name, the recipe of that module, the layer_range end its whole-stack slice gave or None): a
    ``models:`` merge, or for the text decoder's frankenmerge a ``slices:`` one. A module's parameters rank above
    the top-level ones; a slice's above the module's."""
    check_names(list(recipe.modules))
    shared = recipe.model_dump(by_alias=True, exclude={"models", "slices", "modules", "parameters", "name"})
    out = []
    for name, mod in recipe.modules.items():
        params = {**recipe.parameters, **mod.parameters}
        base, end = recipe.base_model, None
        if mod.slices is not None and name in FRANKEN:  # slices of the text decoder: any, as at top level
            out.append((name, Recipe.model_validate({**shared, "parameters": params,
                                                     "slices": [sl.model_dump() for sl in mod.slices]}), None))
            continue
        if mod.slices is not None:
            if not _whole_stack(mod):
                raise MergeError(f"modules: {name}: slices that rebuild the layer stack are supported for the text "
                                 f"decoder only ({', '.join(FRANKEN)}); give this module one slice over its whole "
                                 f"stack, or `models:`")
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
