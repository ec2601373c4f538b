"""Every registered method, end to end on tiny random Llama and GPT-2 models: recipe -> folder ->
`from_pretrained` -> logits equal to the same merge computed in memory, and finite."""
from __future__ import annotations

import pytest
import torch
from conftest import method_inputs

from mergesmith import merge_state_dicts
from mergesmith.methods.base import list_methods
from mergesmith.run import run_recipe

METHODS = [m for m in list_methods() if not m.name.startswith("_")]




@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", METHODS, ids=[m.name for m in METHODS])
def test_method_end_to_end(spec, arch, tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    zoo = tiny_zoo(arch)
    base, models = method_inputs(spec, zoo)
    params = dict(spec.example)
    recipe = {"merge_method": spec.name, "models": [{"model": str(m)} for m in models], "parameters": params,
              "random_seed": 3}
    if base is not None:
        recipe["base_model"] = str(base)
    out = tmp_path / "merged"
    run_recipe(recipe, out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()

    sd = merge_state_dicts(spec.name, [str(m) for m in models], base=str(base) if base else None, seed=3, **params)
    ref = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    _, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        a, b = merged(ids).logits, ref(ids).logits
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-5), f"{spec.name}: folder and in-memory merges differ"
