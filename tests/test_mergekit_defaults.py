"""`defaults: mergekit` (recipe key, `--defaults mergekit`, `defaults=` in the API): the parameters a recipe does
not set take mergekit 0.1.5's values (MethodSpec.mergekit_params) instead of the papers' defaults, so a
model card's recipe gives the model the card describes. Tensor-level parity with mergekit itself is checked
by benchmarks/mergekit_parity.py (docs/mergekit_parity.md)."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import cli, load_state
from mergesmith import merge_state_dicts
from mergesmith.api import method_params
from mergesmith.methods.base import MergeError, get_method, list_methods, register
from mergesmith.run import plan_recipe, run_recipe

# mergekit 0.1.5's defaults and settings, read from its source (merge_methods/registry.py,
# generalized_task_arithmetic.py, sparsify.py, model_stock.py), written out here independently of the specs
MERGEKIT = {
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True, "scope": "tensor", "zero_sign": "positive"},
    "dare_ties": {"density": 1.0, "ties_density": 1.0, "rescale": "l1", "normalize": False, "lambda": 1.0},
    "dare_linear": {"density": 1.0, "rescale": "l1", "normalize": False, "lambda": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "scope": "tensor", "lambda": 1.0, "normalize": False},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01, "scope": "tensor", "lambda": 1.0},
    "della": {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": "l1"},
    "della_linear": {"density": 1.0, "epsilon": 0.15, "lambda": 1.0, "rescale": "l1", "normalize": False},
    "model_stock": {"clamp": False},
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "linear": {"normalize": True},
    "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"select_topk": 1.0, "normalize": True},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


def _value(p, name):
    v = p[name]
    return v[0] if isinstance(v, list) else v


@pytest.mark.parametrize("method", sorted(MERGEKIT))
def test_resolved_parameters_are_mergekits(method):
    p = method_params(method, 2, "model.layers.0.mlp.up_proj.weight", defaults="mergekit")
    for name, want in MERGEKIT[method].items():
        assert _value(p, name) == want, (method, name)


def test_recipe_values_win_over_the_mergekit_layer():
    p = method_params("ties", 2, defaults="mergekit", density=[0.3, 0.6], scope="global")
    assert p["density"] == [0.3, 0.6] and p["scope"] == "global" and p["normalize"] is True
    paper = method_params("ties", 2)
    assert paper["density"] == [0.2, 0.2] and paper["scope"] == "global"
    with pytest.raises(MergeError, match="defaults: 'mergkit' is not one of paper, mergekit"):
        method_params("ties", 2, defaults="mergkit")


def test_every_mergekit_setting_is_a_parameter_of_its_method():
    for spec in list_methods():
        names = {p.name for p in spec.params}
        assert set(spec.mergekit_params) <= names, spec.name
    with pytest.raises(RuntimeError, match="are not its parameters"):
        register("bogus_mk", paper="-", math="-", base="none", granularity="element",
                 mergekit_params={"nope": 1})(lambda ctx, b, ms, p: ms[0])
    assert "defaults: mergekit  ->  density: 1.0" in get_method("ties").describe()


def _recipe(z, **extra):
    return {"merge_method": "ties", "base_model": str(z["base"]), "dtype": "float32",
            "models": [{"model": str(z["ft0"]), "parameters": {"weight": 0.7}},
                       {"model": str(z["ft1"]), "parameters": {"weight": 0.5}}], **extra}


def test_recipe_key_cli_flag_and_api_agree(tiny_zoo, tmp_path):
    """The same ties recipe without density: `defaults: mergekit` in the recipe, `--defaults mergekit` on the
    command line and `defaults="mergekit"` in merge_state_dicts give the same tensors, equal to the recipe with
    mergekit's settings written out, and unlike the paper's defaults (density 0.2 over the whole model)."""
    z = tiny_zoo("llama")
    explicit = _recipe(z, parameters={"density": 1.0, "scope": "tensor", "exact_topk": True, "weighted_elect": True,
                                      "zero_sign": "positive", "normalize": True})
    run_recipe(explicit, tmp_path / "explicit")
    run_recipe(_recipe(z, defaults="mergekit"), tmp_path / "key")
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(z)))
    assert cli("merge", tmp_path / "r.yml", tmp_path / "flag", "--defaults", "mergekit", "-q") == 0
    run_recipe(_recipe(z), tmp_path / "paper")
    want = load_state(tmp_path / "explicit")
    api = merge_state_dicts("ties", [str(z["ft0"]), str(z["ft1"])], base=str(z["base"]), weight=[0.7, 0.5],
                            defaults="mergekit")
    paper = load_state(tmp_path / "paper")
    for out in ("key", "flag"):
        got = load_state(tmp_path / out)
        assert all(torch.equal(got[k], want[k]) for k in want), out
    assert all(torch.allclose(api[k].float(), want[k]) for k in want)
    assert any(not torch.equal(paper[k], want[k]) for k in want)
    assert yaml.safe_load((tmp_path / "flag" / "mergesmith_recipe.yml").read_text())["defaults"] == "mergekit"
    assert "scope=tensor" in plan_recipe(_recipe(z), defaults="mergekit").describe().replace("'", "")


def test_bad_defaults_value_is_a_clear_error(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    with pytest.raises(MergeError, match="defaults: 'mergekitt' is not one of paper, mergekit"):
        plan_recipe(_recipe(z, defaults="mergekitt"))
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(z)))
    assert cli("merge", tmp_path / "r.yml", tmp_path / "o", "--defaults", "papr", "-q") != 0
    assert not (tmp_path / "o").exists()


def test_paper_defaults_that_differ_from_mergekits_are_named_once(tiny_zoo):
    """A recipe relying on a default where paper and mergekit differ gets one warning naming both and the
    switch; setting those parameters, or `defaults: mergekit`, silences it."""
    z = tiny_zoo("llama")
    w = [x for x in plan_recipe(_recipe(z)).warnings if "paper's defaults" in x]
    assert len(w) == 1 and "density 0.2" in w[0] and "density 1.0" in w[0] and "defaults: mergekit" in w[0]
    assert not any("paper's defaults" in x for x in plan_recipe(_recipe(z, defaults="mergekit")).warnings)
    assert not any("paper's defaults" in x for x in plan_recipe(_recipe(z, defaults="paper")).warnings)  # chosen
    set_all = {"density": 0.5, "scope": "global", "exact_topk": False, "weighted_elect": False,
               "zero_sign": "majority", "normalize": True}
    assert not any("paper's defaults" in x for x in plan_recipe(_recipe(z, parameters=set_all)).warnings)
