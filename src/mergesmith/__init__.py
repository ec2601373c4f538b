"""mergesmith: merge neural-network checkpoints with every published method, in bounded memory.

Public API::

    merge_state_dicts(method, models, base=None, seed=0, **params) -> state dict
    merge(recipe, out_dir, **options)         # run a recipe (YAML path, text, dict) to an HF folder
    load_recipe(source) -> Recipe
    list_methods() -> [MethodSpec]
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing mergesmith must not import torch
    if name in ("merge_state_dicts", "merge_tensors", "merge"):
        from . import api

        return getattr(api, name)
    if name == "load_recipe":
        from .recipe import load_recipe

        return load_recipe
    if name == "list_methods":
        from .methods.base import list_methods

        return list_methods
    raise AttributeError(name)


__all__ = ["merge_state_dicts", "merge_tensors", "merge", "load_recipe", "list_methods", "__version__"]
