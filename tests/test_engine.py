"""Engine, planner, writer and CLI: end-to-end on tiny HF models, bad inputs, atomic output."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import cli, load_state, on_torch_path, spy_kernels
from mergesmith import merge_state_dicts
from mergesmith.engine import DictSink, execute
from mergesmith.methods.base import MergeError, Param, register
from mergesmith.io.checkpoint import open_checkpoint
from mergesmith.plan import Planner
from mergesmith.recipe import Recipe
from mergesmith.run import plan_recipe, run_recipe


def recipe(method, base, models, **kw):
    r = {"merge_method": method, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        r["base_model"] = str(base)
    r.update(kw)
    return r


# --- in-memory API -----------------------------------------------------------------------------------


def test_merge_state_dicts_linear_golden():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "n": torch.tensor(7, dtype=torch.int64)}
    b = {"w": torch.tensor([[3.0, 2.0], [1.0, 0.0]]), "n": torch.tensor(7, dtype=torch.int64)}
    out = merge_state_dicts("linear", [a, b], weight=[1.0, 3.0])
    assert torch.allclose(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert out["n"].dtype == torch.int64 and out["n"].item() == 7  # integer buffers copied


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_linear_block_kernel_equals_the_torch_form(stored, monkeypatch):
    """Tensors of two blocks or more go to the fused kernel on the stored bits (bf16 output written
    directly): the bytes of the torch form, one fused multiply-add per model (``add_(alpha=)``, as
    mergekit's ``addcmul_``; reference: the product and sum in float64, exact, rounded once); unit weights,
    mixed weights, normalize on and off, signed zeros."""
    import mergesmith.methods._fused as F

    calls = spy_kernels(monkeypatch, "linear")
    real, dtypes = F.linear, set()
    monkeypatch.setattr(F, "linear", lambda ms, *a: dtypes.add(ms[0].dtype) or real(ms, *a))
    g = torch.Generator().manual_seed(31)
    models = [{"w": torch.randn(700, 512, generator=g).to(stored)} for _ in range(3)]
    models[0]["w"][0, :8] = -0.0
    models[1]["w"][0, :8] = -0.0
    models[2]["w"][0, :8] = -0.0
    for params in ({}, {"weight": [0.3, 1.0, 2.7]}, {"weight": [0.3, 1.7, -0.2], "normalize": False}):
        got = merge_state_dicts("linear", models, **params)["w"]
        want = on_torch_path(monkeypatch, lambda: merge_state_dicts("linear", models, **params)["w"])
        assert got.dtype == want.dtype == stored
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), params
        w = params.get("weight", [1.0] * 3)
        ref = torch.zeros(700, 512)
        for wi, m in zip(w, models):  # fma: the float64 product of two float32s is exact; one rounding
            ref = (ref.double() + m["w"].double() * torch.tensor(wi, dtype=torch.float32).double()).float()
        if params.get("normalize", True):
            ref = ref / torch.tensor(sum(w), dtype=torch.float32)
        assert torch.equal(want, ref.to(stored)), params
        got32 = merge_state_dicts("linear", models, dtype="float32", **params)["w"]  # the kernel's float32 output
        assert torch.equal(got32, ref) and torch.equal(got32.signbit(), ref.signbit()), params
    assert calls, "the kernel did not run"
    # bf16 inputs: the kernel reads their bits (int16 blocks; bf16 or float32 output), float32 inputs their values
    assert dtypes == {np.dtype(np.int16) if stored == torch.bfloat16 else np.dtype(np.float32)}, dtypes


def test_one_model_in_is_that_model_out():
    a = {"w": torch.randn(5, 3)}
    assert torch.equal(merge_state_dicts("linear", [a])["w"], a["w"])
    base = {"w": torch.randn(5, 3)}
    assert torch.allclose(merge_state_dicts("task_arithmetic", [a], base=base)["w"], a["w"], atol=1e-6)


def test_nn_module_inputs_and_gradient_params():
    torch.manual_seed(0)
    m0, m1 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    out = merge_state_dicts("linear", [m0, m1], weight=[{"filter": "bias", "value": 1.0}, {"value": 0.0}], normalize=False)
    assert torch.allclose(out["bias"], m0.bias + m1.bias)
    assert torch.allclose(out["weight"], torch.zeros(4, 4))


def test_bf16_in_bf16_out_matches_fp32_reference():
    a = {"w": torch.randn(8, 8).bfloat16()}
    b = {"w": torch.randn(8, 8).bfloat16()}
    out = merge_state_dicts("linear", [a, b])
    assert out["w"].dtype == torch.bfloat16
    ref = (a["w"].float() + b["w"].float()) / 2
    assert torch.allclose(out["w"].float(), ref, atol=1e-2)


def test_chunked_execution_equals_whole_tensor(tiny_zoo):
    z = tiny_zoo("llama")
    plan = plan_recipe(recipe("task_arithmetic", z["base"], [z["ft0"], z["ft1"]], parameters={"lambda": 0.7}))
    whole, chunked = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    execute(plan, chunked, chunk_elements=100)  # forces row chunks on every matrix
    for k in whole.tensors:
        assert torch.equal(whole.tensors[k], chunked.tensors[k]), k


@pytest.mark.parametrize("method,params", [
    ("slerp", {"t": 0.3}),
    ("nuslerp", {"weight": [1.0, 2.0]}),
    ("nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {"weight": [1.0, 2.0, 0.5]}),
    ("model_stock", {}),
    ("karcher", {}),
    ("karcher", {"include_base": False, "max_iter": 30}),
    ("sce", {}),  # one phase: the energies
    ("sce", {"select_topk": 0.5}),  # three: the radix selection of the variance threshold, then energies
    ("sce", {"select_topk": 0.3, "normalize": False}),
    ("arcee_fusion", {}),
    ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 1.0}),  # per-tensor overlap counts, then the apply
    ("ties", {"density": 0.3, "scope": "tensor", "zero_sign": "positive"}),  # two selection phases, then the apply
    ("ties", {"density": [0.3, 0.8, 0.5], "scope": "tensor", "exact_topk": True, "zero_sign": "positive"}),
])
def test_tensor_wise_methods_stream_big_tensors_in_two_phases(tiny_zoo, monkeypatch, method, params):
    """Tensors too big to hold whole are streamed: the sums phases over row chunks, then the apply chunks."""
    import mergesmith.engine as E
    from mergesmith.methods.base import get_method

    z = tiny_zoo("llama")
    n = {"slerp": 1, "nuslerp": 2, "arcee_fusion": 1}.get(method, 3)
    plan = plan_recipe(recipe(method, z["base"], [z[f"ft{i}"] for i in range(n)], parameters=params))
    whole = DictSink(plan)
    execute(plan, whole)
    monkeypatch.setattr(E, "PREFETCH_BYTES", 1024)  # every matrix counts as big
    ex = E.Executor(plan, DictSink(plan), chunk_elements=100)
    job = next(j for j in plan.jobs if len(j.shape) == 2)
    units = ex._units(job)
    phases = [u.phase for u in units]
    spec = get_method(method)
    n_phases = spec.phases(job.params)
    assert spec.sums is not None and phases.count("sums") == n_phases * phases.count("apply") > 1
    assert [u.step for u in units if u.phase == "sums"] == sorted(u.step for u in units if u.phase == "sums")
    assert n_phases == {"sce": 3 if params.get("select_topk", 1) < 1 else 1, "ties": 2}.get(method, 1)
    ex.run()
    for k in whole.tensors:
        torch.testing.assert_close(ex.sink.tensors[k], whole.tensors[k], rtol=1e-5, atol=1e-6, msg=k)


def _standardize_sums(ctx, base, models, p):
    """Phase 0: element count and sum; phase 1: sum of squared deviations from the mean (phase 0's
    result); phase 2 (``order``): the first row index of each chunk, kept per chunk."""
    from mergesmith.methods.base import ChunkParts

    x = models[0].double()
    if ctx.phase == 0:
        return torch.tensor([x.numel(), x.sum().item()], dtype=torch.float64)
    if ctx.phase == 1:
        return float(((x - ctx.sums["mean"]) ** 2).sum())
    return ChunkParts({ctx.chunk: ctx.rows[0] if ctx.rows is not None else 0})


def _standardize_finish(k, prev, total, p):
    if k == 0:
        return {"mean": float(total[1] / total[0]), "n": int(total[0])}
    if k == 1:
        return {**prev, "std": (total / prev["n"]) ** 0.5}
    return {**prev, "starts": total.ordered()}


@register("_test_standardize", paper="test", math="(x - mean) / std over the tensor", base="none",
          granularity="tensor", params=(Param("order", bool, False),), max_models=1,
          sums=_standardize_sums, sum_phases=lambda p: 3 if p["order"] else 2, finish_sums=_standardize_finish)
def _standardize(ctx, base, models, p):
    s = ctx.sums
    if s is None:  # whole tensor: the same phases on the one chunk
        for k in range(3 if p["order"] else 2):
            s = _standardize_finish(k, s, _standardize_sums(dataclasses.replace(ctx, phase=k, sums=s), base, models, p), p)
    if p["order"]:  # the chunks' first rows, in chunk order, are increasing and start at 0
        assert s["starts"][0] == 0 and s["starts"] == sorted(s["starts"])
    return ((models[0].double() - s["mean"]) / s["std"]).float()


@pytest.mark.parametrize("order", [False, True])
def test_sums_phases_see_the_previous_result(tiny_zoo, monkeypatch, order):
    """A toy method with 2-3 sums phases (the mean, then the deviations from it, then per-chunk
    ChunkParts): streamed in row chunks it equals the whole-tensor result."""
    import mergesmith.engine as E

    z = tiny_zoo("llama")
    plan = plan_recipe(recipe("_test_standardize", None, [z["ft0"]], parameters={"order": order}))
    whole = DictSink(plan)
    execute(plan, whole)
    monkeypatch.setattr(E, "PREFETCH_BYTES", 1024)
    ex = E.Executor(plan, DictSink(plan), chunk_elements=100)
    job = next(j for j in plan.jobs if len(j.shape) == 2)
    steps = [u.step for u in ex._units(job) if u.phase == "sums"]
    assert sorted(set(steps)) == list(range(3 if order else 2)) and steps == sorted(steps)
    ex.run()
    for k in whole.tensors:
        torch.testing.assert_close(ex.sink.tensors[k], whole.tensors[k], rtol=1e-5, atol=1e-5, msg=k)


# --- end to end through folders ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recipe_to_folder_loads_and_matches_memory(tiny_zoo, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    z = tiny_zoo(arch)
    r = recipe("task_arithmetic", z["base"], [z["ft0"], z["ft1"]], parameters={"lambda": 0.5},
               chat_template="chatml")
    out = tmp_path / "out"
    run_recipe(r, out, shard_size="20KB")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    for f in ("config.json", "README.md", "mergesmith_recipe.yml", "mergesmith_provenance.json", "tokenizer.json"):
        assert f in files
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: transformers" in card and "task_arithmetic" in card
    prov = json.loads((out / "mergesmith_provenance.json").read_text())
    assert prov["seed"] == 0 and prov["inputs"][0]["files"][0]["bytes"] > 0 and len(prov["inputs"][0]["files"][0]["header_sha256"]) == 64
    assert yaml.safe_load((out / "mergesmith_recipe.yml").read_text())["merge_method"] == "task_arithmetic"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).chat_template.startswith("{% for message")
    sd = merge_state_dicts("task_arithmetic", [str(z["ft0"]), str(z["ft1"])], base=str(z["base"]), **{"lambda": 0.5})
    ref = AutoModelForCausalLM.from_pretrained(z["base"]).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5)
    if arch == "gpt2":  # tied embeddings stay tied: no lm_head tensor written
        assert "lm_head.weight" not in load_state(out)
        assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()


def test_output_dtype_and_config(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    out = tmp_path / "o"
    run_recipe(recipe("linear", None, [z["ft0"], z["ft1"]], out_dtype="bfloat16"), out)
    sd = load_state(out)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    # mergekit also reads torch-style names
    plan = plan_recipe(recipe("linear", None, [z["ft0"], z["ft1"]], dtype="torch.float16"))
    assert {j.dtype for j in plan.jobs} == {torch.float16}
    with pytest.raises(MergeError, match="unknown dtype 'torch.int3'"):
        plan_recipe(recipe("linear", None, [z["ft0"]], dtype="torch.int3"))


def test_unindexed_shards_skip_mistrals_consolidated_file(tmp_path):
    """A folder of several safetensors without an index reads them all, except consolidated.safetensors (the
    same weights under mistral-inference names, beside the HF shards in Mistral's repos)."""
    from safetensors.torch import save_file

    from mergesmith.io.checkpoint import open_checkpoint

    save_file({"model.a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"layers.0.attention.wq.weight": torch.ones(2)}, str(tmp_path / "consolidated.safetensors"))
    assert sorted(open_checkpoint(str(tmp_path)).keys()) == ["model.a", "model.b"]


def test_bin_inputs_with_weights_only(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    sd = load_state(z["ft0"])
    binf = tmp_path / "m.bin"
    torch.save(sd, binf)
    out = merge_state_dicts("linear", [str(binf), str(z["ft0"])])
    for k in sd:
        assert torch.allclose(out[k], sd[k])


def test_slices_passthrough_frankenmerge(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    z = tiny_zoo("llama")
    r = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(z["ft0"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(z["ft1"]), "layer_range": [1, 3]}]},
        ],
    }
    out = tmp_path / "frank"
    run_recipe(r, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    got, a, b = load_state(out), load_state(z["ft0"]), load_state(z["ft1"])
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[name.format(0)], a[name.format(0)])
    assert torch.equal(got[name.format(1)], a[name.format(1)])
    assert torch.equal(got[name.format(2)], b[name.format(1)])
    assert torch.equal(got[name.format(3)], b[name.format(2)])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # pre from first slice
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # post from last slice
    AutoModelForCausalLM.from_pretrained(out)


def test_gradient_parameters_interpolate_over_layers(tiny_zoo):
    z = tiny_zoo("llama")
    plan = plan_recipe(recipe("linear", None, [z["ft0"], z["ft1"]],
                              parameters={"weight": [0.0, 1.0], "normalize": False}))
    w = {j.out_name: j.params["weight"] for j in plan.jobs}
    assert w["model.layers.0.mlp.up_proj.weight"] == [0.0, 0.0]
    assert w["model.layers.1.mlp.up_proj.weight"] == [0.5, 0.5]
    assert w["model.layers.2.mlp.up_proj.weight"] == [1.0, 1.0]
    assert w["model.embed_tokens.weight"] == [0.0, 0.0]  # outside the stack: t = 0 (mergekit)


def test_gradients_run_over_each_layer_stacks_own_depth():
    """A model with two layer stacks (a VLM's 4 text layers and 2 vision blocks, as Qwen2.5-VL stores them):
    a gradient runs over each stack's depth (mergekit's per-module layer counts), not over the deepest one's."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.language_model.layers.{i}.mlp.up_proj.weight" for i in range(4)]
    names += [f"model.visual.blocks.{i}.attn.qkv.weight" for i in range(2)] + ["model.visual.merger.mlp.0.weight"]
    base = {n: torch.randn(3, 2, generator=g) for n in names}
    ft = {n: base[n] + 1.0 for n in names}
    plan = Planner(Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "b",
                                          "models": [{"model": "f", "parameters": {"weight": [0.0, 1.0]}}]}),
                   opener=lambda r: open_checkpoint({"b": base, "f": ft}[r], label=r)).build()
    w = {j.out_name: j.params["weight"][0] for j in plan.jobs}
    assert [w[f"model.language_model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert [w[f"model.visual.blocks.{i}.attn.qkv.weight"] for i in range(2)] == [0.0, 1.0]
    assert w["model.visual.merger.mlp.0.weight"] == 0.0  # outside both stacks
    assert {j.num_layers for j in plan.jobs if "blocks" in j.out_name} == {2}


# --- bad input: one clear line, before any weight is read -----------------------------------------------


def _bad(tmp_path, r, match):
    with pytest.raises(MergeError, match=match):
        run_recipe(r, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_parameters_of_other_methods_are_ignored_with_a_warning(tiny_zoo, tmp_path, capsys):
    """Model-card recipes carry parameters the method does not take (`weight` under sce): mergekit ignores
    them, so does a recipe here, with a warning; a name no method has stays an error."""
    z = tiny_zoo("llama")
    plain = run_recipe(recipe("sce", z["base"], [z["ft0"], z["ft1"]], parameters={"select_topk": 0.5}), tmp_path / "a")
    r = recipe("sce", z["base"], [z["ft0"], z["ft1"]], parameters={"select_topk": 0.5, "density": 0.3})
    r["models"][0]["parameters"] = {"weight": 0.2}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(r))
    assert cli("merge", tmp_path / "r.yml", "-o", tmp_path / "b", "--quiet") == 0
    err = capsys.readouterr().err
    assert "parameter 'weight' for model" in err and "parameter 'density' in `parameters`" in err
    assert "not used by 'sce'; ignored" in err
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not plain.warnings
    with pytest.raises(MergeError, match="unknown parameter 'densty'"):
        run_recipe(recipe("sce", z["base"], [z["ft0"]], parameters={"densty": 0.3}), tmp_path / "c")
    with pytest.raises(MergeError, match="unknown parameter 'density'"):
        merge_state_dicts("sce", [str(z["ft0"])], base=str(z["base"]), density=0.3)  # the Python API stays strict


def test_bad_inputs(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    _bad(tmp_path, recipe("dare-tiez", z["base"], [z["ft0"]]), "unknown merge method")
    _bad(tmp_path, recipe("task_arithmetic", z["base"], [z["ft0"]], parameters={"lamda": 1}), "unknown parameter 'lamda'.*lambda")
    _bad(tmp_path, recipe("task_arithmetic", z["base"], [tmp_path / "nope"]), "model not found")
    _bad(tmp_path, recipe("task_arithmetic", None, [z["ft0"]]), "needs a base model")
    _bad(tmp_path, recipe("task_arithmetic", z["base"], [z["ft0"]], parameters={"lambda": "x"}), "not a valid float")
    _bad(tmp_path, {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(z["ft0"]), "layer_range": [0, 9]}]}]},
         "out of range")
    _bad(tmp_path, {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(z["ft0"]), "layer_range": [2, 1]}]}]},
         "invalid layer_range")
    _bad(tmp_path, {"merge_method": "linear", "models": [{"model": str(z["ft0"])}], "colour": 1}, "unknown key")


def test_missing_tensor_shape_and_vocab_mismatch(tiny_zoo, tmp_path):
    from safetensors.torch import save_file

    z = tiny_zoo("llama")
    sd = load_state(z["ft0"])
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "missing.safetensors")
    _bad(tmp_path, recipe("linear", None, [z["ft1"], tmp_path / "missing.safetensors"]), "'model.norm.weight' is missing")

    sd = load_state(z["ft0"])
    sd["model.norm.weight"] = torch.ones(33)
    save_file(sd, tmp_path / "shape.safetensors")
    _bad(tmp_path, recipe("linear", None, [z["ft1"], tmp_path / "shape.safetensors"]), "shape mismatch for 'model.norm.weight'")

    sd = load_state(z["ft0"])
    sd["model.embed_tokens.weight"] = torch.randn(70, 32)
    sd["lm_head.weight"] = torch.randn(70, 32)
    save_file(sd, tmp_path / "vocab.safetensors")
    _bad(tmp_path, recipe("linear", None, [z["ft1"], tmp_path / "vocab.safetensors"]), "vocabulary size mismatch.*embed_policy")
    out = merge_state_dicts("linear", [str(z["ft1"]), str(tmp_path / "vocab.safetensors")], embed_policy="truncate")
    assert out["model.embed_tokens.weight"].shape == (64, 32)
    ref = (load_state(z["ft1"])["model.embed_tokens.weight"] + sd["model.embed_tokens.weight"][:64]) / 2
    assert torch.allclose(out["model.embed_tokens.weight"], ref)


def test_corrupt_file_is_reported(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    data = (z["ft0"] / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _bad(tmp_path, recipe("linear", None, [z["ft1"], tmp_path / "trunc.safetensors"]), "corrupt or unreadable")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 100)
    _bad(tmp_path, recipe("linear", None, [z["ft1"], tmp_path / "garbage.safetensors"]), "corrupt or unreadable")


@register("_test_explodes", paper="test", math="raises on the 5th tensor", base="none", granularity="tensor",
          params=(Param("weight", float, 1.0, scope="model"),))
def _explodes(ctx, base, models, p):
    _explodes.calls = getattr(_explodes, "calls", 0) + 1
    if _explodes.calls == 5:
        raise RuntimeError("injected failure")
    return models[0]


def test_failure_mid_merge_leaves_no_output(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    with pytest.raises(RuntimeError, match="injected"):
        run_recipe(recipe("_test_explodes", None, [z["ft0"]]), tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder remains


def test_too_little_disk_space_is_an_error_before_any_weight_is_read(tiny_zoo, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from mergesmith.io import checkpoint

    z = tiny_zoo("llama")
    r = recipe("linear", None, [z["ft0"], z["ft1"]])
    need = run_recipe(r, tmp_path / "unused", dry_run=True).output_bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - need + 1, need - 1))

    def boom(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoint.SafetensorsCheckpoint, "get", boom)
    with pytest.raises(MergeError, match=r"not enough disk space for the merged model .*out.*GB free"):
        run_recipe(r, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - need, need))
    with pytest.raises(AssertionError, match="weights were read"):  # exactly enough: the merge starts
        run_recipe(r, tmp_path / "out")

    def unknown(p):
        raise OSError("statvfs not supported")

    monkeypatch.setattr(shutil, "disk_usage", unknown)
    with pytest.raises(AssertionError, match="weights were read"):  # a disk that does not say: no check
        run_recipe(r, tmp_path / "out")


def test_existing_output_needs_overwrite(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = recipe("linear", None, [z["ft0"], z["ft1"]])
    with pytest.raises(MergeError, match="--overwrite"):
        run_recipe(r, out)
    run_recipe(r, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_dry_run_reads_no_weights(tiny_zoo, monkeypatch):
    from mergesmith.io import checkpoint

    z = tiny_zoo("llama")

    def boom(*a, **k):
        raise AssertionError("weights were read during planning")

    monkeypatch.setattr(checkpoint.SafetensorsCheckpoint, "get", boom)
    plan = run_recipe(recipe("task_arithmetic", z["base"], [z["ft0"], z["ft1"]]), "/tmp/unused-out", dry_run=True)
    text = plan.describe()
    assert "task_arithmetic" in text and "model.layers.2.mlp.up_proj.weight" in text and "MB" in text


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_merge_methods_and_errors(tiny_zoo, tmp_path, capsys):
    z = tiny_zoo("llama")
    rfile = tmp_path / "r.yml"
    rfile.write_text(yaml.safe_dump(recipe("task_arithmetic", z["base"], [z["ft0"], z["ft1"]], parameters={"lambda": 0.3})))
    assert cli("merge", rfile, "-o", tmp_path / "out", "--dry-run") == 0
    assert "output tensors" in capsys.readouterr().out
    assert cli("merge", rfile, "-o", tmp_path / "out", "-q") == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert cli("merge", rfile, "-o", tmp_path / "out") == 2
    assert "error: output folder" in capsys.readouterr().err
    assert cli("methods") == 0
    listing = capsys.readouterr().out
    assert "task_arithmetic" in listing and "linear" in listing
    assert cli("methods", "task_arithmetic") == 0
    assert "lambda" in capsys.readouterr().out
    assert cli("methods", "nosuch") == 2
    rfile.write_text("merge_method: linear\nmodels: [{model: /nonexistent}]\n")
    assert cli("merge", rfile, "-o", tmp_path / "o2") == 2
    assert "model not found" in capsys.readouterr().err


def test_seed_reproducible_across_threads(tiny_zoo, tmp_path):
    """Identical bytes for identical recipe + seed, whatever the thread count."""
    from mergesmith.methods.base import list_methods

    random_methods = [m.name for m in list_methods() if m.name in ("dare_ties", "dare_linear", "della")]
    method = random_methods[0] if random_methods else "task_arithmetic"
    z = tiny_zoo("llama")
    r = recipe(method, z["base"], [z["ft0"], z["ft1"]], random_seed=7)
    run_recipe(r, tmp_path / "a", threads=1)
    run_recipe(r, tmp_path / "b", threads=2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    if random_methods:
        r["random_seed"] = 8
        run_recipe(r, tmp_path / "c")
        assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_method_checks_run_at_planning(tiny_zoo, monkeypatch):
    """Per-tensor parameter checks and statistics-pass checks fail before any weight is read."""
    from mergesmith.io import checkpoint

    def boom(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoint.SafetensorsCheckpoint, "get", boom)
    z = tiny_zoo("llama")
    with pytest.raises(MergeError, match="scope global needs one 'density'"):
        plan_recipe(recipe("ties", z["base"], [z["ft0"], z["ft1"]], parameters={"density": [0.2, 0.6], "scope": "global"}))
    # without an explicit scope a per-layer density is mergekit's recipe: its per-tensor top-k, said in a warning
    plan = plan_recipe(recipe("ties", z["base"], [z["ft0"], z["ft1"]], parameters={"density": [0.2, 0.6]}))
    assert {j.params["scope"] for j in plan.jobs if j.method} == {"tensor"}
    assert any("this merge uses scope: tensor" in w for w in plan.warnings)
    with pytest.raises(MergeError, match="density - epsilon"):
        plan_recipe(recipe("della", z["base"], [z["ft0"], z["ft1"]], parameters={"density": 0.9, "epsilon": 0.2}))
    plan_recipe(recipe("ties", z["base"], [z["ft0"], z["ft1"]], parameters={"density": [0.2, 0.6], "scope": "tensor"}))


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),                      # global scope: thresholds from the statistics pass
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),  # per-row ranking
    ("ties", {"density": 0.3, "scope": "tensor"}),   # not chunkable: must still agree (runs whole)
    ("consensus_ties", {"density": 0.3, "k": 2}),    # global trim + majority pass, then per-element masks
    ("pcb", {"ratio": 0.2}),                         # whole-model order statistics, then per element
    ("lines", {"beta": 0.5}),                        # one factor per tensor (its layer)
    ("lines", {"merge": "ties", "density": 0.3}),    # + the TIES statistics and alpha's L1 pass
    ("ramplus", {"epsilon": 0.02, "r": 0.5}),        # whole-model overlap counts, then per element
])
def test_chunked_statistics_and_apply_equal_whole(tiny_zoo, method, params):
    z = tiny_zoo("llama")
    plan = plan_recipe(recipe(method, z["base"], [z["ft0"], z["ft1"], z["ft2"]], parameters=params))
    whole, chunked = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    execute(plan, chunked, chunk_elements=100)
    for k in whole.tensors:
        assert torch.equal(whole.tensors[k], chunked.tensors[k]), k


def test_rss_trim_hands_memory_back_only_above_the_budget():
    import sys

    from mergesmith import _memory

    assert _memory.trim_if_above(1 << 50) is False  # far below the budget: no call
    if sys.platform.startswith("linux") and _memory._glibc() is not None:
        assert _memory.rss_bytes() > 0
        assert _memory.trim_if_above(0) is True


@register("_test_explodes_concurrently", paper="test", math="raises on the 5th tensor, several tensors at once",
          base="none", granularity="tensor", params=(Param("weight", float, 1.0, scope="model"),),
          concurrent_tensors=True)
def _explodes_concurrently(ctx, base, models, p):
    _explodes_concurrently.calls = getattr(_explodes_concurrently, "calls", 0) + 1
    if _explodes_concurrently.calls == 5:
        raise RuntimeError("injected failure")
    return models[0]


def test_failure_in_a_concurrent_tensor_leaves_no_output(tiny_zoo, tmp_path, monkeypatch):
    import mergesmith.engine as E

    monkeypatch.setattr(E.Executor, "_tensor_workers", lambda self: 2)
    z = tiny_zoo("llama")
    with pytest.raises(RuntimeError, match="injected"):
        run_recipe(recipe("_test_explodes_concurrently", None, [z["ft0"]]), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_concurrent_tensors_give_the_sequential_result(tiny_zoo, tmp_path, monkeypatch):
    """Spectral methods compute several tensors at once on single-threaded workers (concurrent_tensors):
    the same tensors as one at a time (to float32 rounding: LAPACK's results depend on its thread count)."""
    import threading

    import mergesmith.engine as E
    from mergesmith.methods.base import get_method

    z = tiny_zoo("llama")
    r = recipe("tsv_m", z["base"], [z["ft0"], z["ft1"]])
    assert get_method("tsv_m").concurrent_tensors
    names = set()
    real = E.Executor._compute

    def spy(self, *a, **k):
        names.add(threading.current_thread().name.split("_")[0])
        return real(self, *a, **k)

    monkeypatch.setattr(E.Executor, "_compute", spy)
    monkeypatch.setattr(E.Executor, "_tensor_workers", lambda self: 2)
    run_recipe(r, tmp_path / "conc")
    assert names == {"mergesmith-compute"}
    monkeypatch.setattr(E.Executor, "_tensor_workers", lambda self: 0)
    names.clear()
    run_recipe(r, tmp_path / "seq")
    assert names == {"MainThread"}
    a, b = load_state(tmp_path / "conc"), load_state(tmp_path / "seq")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k


def test_tensor_workers_setting(tiny_zoo, tmp_path, monkeypatch):
    import mergesmith.engine as E

    z = tiny_zoo("llama")
    seen = []
    real = E.Executor._tensor_workers
    monkeypatch.setattr(E.Executor, "_tensor_workers", lambda self: seen.append(real(self)) or seen[-1])
    monkeypatch.setenv("MERGESMITH_TENSOR_WORKERS", "1")
    run_recipe(recipe("tsv_m", z["base"], [z["ft0"], z["ft1"]]), tmp_path / "one")
    assert seen[-1] == 0  # one tensor at a time
    monkeypatch.setenv("MERGESMITH_TENSOR_WORKERS", "two")
    with pytest.raises(MergeError, match="MERGESMITH_TENSOR_WORKERS must be a whole number"):
        run_recipe(recipe("tsv_m", z["base"], [z["ft0"], z["ft1"]]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_buffer_pool_reuses_only_unreferenced_buffers(monkeypatch):
    import mergesmith.io.buffers as B

    monkeypatch.setattr(B, "_BUFS", [])
    monkeypatch.setattr(B, "POOL_BYTES", 8 << 20)
    a = B.empty((1 << 20,), torch.float32)  # 4 MB: pooled
    pa = a.data_ptr()
    view = a[10:20]  # a view keeps the buffer busy after the tensor is gone
    del a
    b = B.empty((1 << 20,), torch.float32)
    assert b.data_ptr() != pa  # still referenced through the view
    del view
    c = B.empty((1 << 19,), torch.float32)  # 2 MB: the freed 4 MB buffer, best fit
    assert c.data_ptr() == pa and c.shape == (1 << 19,)
    del b, c
    assert B.held_bytes() == 8 << 20
    d = B.empty((3 << 20,), torch.float32)  # 12 MB > the pool: plain memory, the pool drops idle buffers
    assert d.numel() == 3 << 20 and B.held_bytes() <= 8 << 20
    small = B.empty((10,), torch.bfloat16)  # below MIN_BYTES: never pooled
    assert small.dtype == torch.bfloat16 and small.shape == (10,)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "della"])
def test_in_memory_inputs_are_never_written(method, monkeypatch):
    """The engine hands these methods their inputs as stored (raw_inputs): the caller's tensors must come
    back untouched, on the fused block path and on the converting path."""
    import mergesmith.methods._fused as F
    import mergesmith.methods._sampling as S

    F.enabled()  # load the kernels: small tensors alone would not (see the next test)
    monkeypatch.setattr(S, "BLOCK", 64)  # the block path on small tensors
    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):  # f16: handed as stored, converted by the method
        base = {"w": torch.randn(40, 33, generator=g).to(dt), "b": torch.randn(33, generator=g).to(dt)}
        models = [{k: v + 0.1 * torch.randn(v.shape, generator=g).to(dt) for k, v in base.items()} for _ in range(3)]
        keep = [{k: v.clone() for k, v in sd.items()} for sd in [base, *models]]
        got = merge_state_dicts(method, models, base=base)
        for sd, ref in zip([base, *models], keep):
            for k in ref:
                assert torch.equal(sd[k], ref[k]), (method, dt, k)
        monkeypatch.setenv("MERGESMITH_FUSED", "0")  # the same bytes from float32 copies and torch ops
        want = merge_state_dicts(method, models, base=base)
        monkeypatch.delenv("MERGESMITH_FUSED")
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (method, dt, k)


def test_a_small_merge_does_not_import_numba():
    """The fused kernels are for tensors of two blocks or more: a small TIES/DARE/DELLA merge starts fast."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from mergesmith import merge_state_dicts\n"
        "g = torch.Generator().manual_seed(0)\n"
        "base = {'w': torch.randn(64, 32, generator=g).bfloat16()}\n"
        "models = [{'w': base['w'] + 0.1} for _ in range(3)]\n"
        "for m in ('ties', 'dare_ties', 'della', 'task_arithmetic'):\n"
        "    merge_state_dicts(m, models, base=base)\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numba_is_warmed_in_the_background_only_for_merges_that_need_the_kernels():
    """A merge with a tensor of two blocks or more starts, in a background thread, what its method's kernels
    need (numba's import and LLVM's start, ~1 s); small merges, methods without kernels (passthrough takes
    its inputs as stored too) and MERGESMITH_FUSED=0 never import numba."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba not installed")
    code = (
        "import sys, torch\n"
        "import mergesmith.methods._fused as F\n"
        "threads = []\n"
        "orig = F.warm_in_background\n"
        "F.warm_in_background = lambda trig: threads.append(orig(trig)) or threads[-1]\n"
        "from mergesmith import merge_state_dicts\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for method, rows in (('passthrough', 600), ('ties', 64), ('ties', 600)):\n"
        "    base = {'w': torch.randn(rows, 512, generator=g).bfloat16()}\n"
        "    models = [{'w': base['w'] + 0.1} for _ in range(2)]\n"
        "    if method == 'passthrough':\n"
        "        merge_state_dicts(method, models[:1])\n"
        "        [t.join(60) for t in threads if t is not None]\n"
        "    else:\n"
        "        merge_state_dicts(method, models, base=base)\n"
        "    print(method, rows, len(threads), 'numba' in sys.modules)\n"
        "print(F._KERNELS is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:4] == ["passthrough 600 1 False", "ties 64 1 False", "ties 600 2 True", "True"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MERGESMITH_FUSED": "0"})
    assert out.stdout.split("\n")[:4] == ["passthrough 600 1 False", "ties 64 1 False", "ties 600 2 False", "False"], out.stdout


@pytest.mark.parametrize("method,params", [
    ("dare_ties", {"density": 0.6}),  # global trim: sample, window and apply kernels draw in their loops
    ("dare_ties", {"density": 0.5, "ties_density": 1.0, "zero_sign": "positive"}),
    ("dare_linear", {"density": 0.7}),
    ("della", {}),
])
def test_draws_inside_the_kernels_at_full_block_size_equal_the_torch_path(method, params, monkeypatch):
    """At the real block size (128K elements: many 1K sub-blocks per block, several rows per DELLA block)
    the kernels that draw DARE's/DELLA's words inside their own loops (``combine_bf16``, ``window_bf16``,
    ``high_hist_bf16``, ``magprune_apply``) give the bytes of the torch path, which draws by numpy."""
    seen = spy_kernels(monkeypatch, "combine_bf16", "window_bf16", "high_hist_bf16", "magprune_apply", "row_keys32",
                       "sub", "sub_into")
    g = torch.Generator().manual_seed(11)
    shapes = {"w": (700, 512), "e": (301, 1000), "b": (512,)}
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.004).to(torch.bfloat16) for k, v in base.items()}
              for _ in range(3)]
    models[0]["e"] = base["e"].clone()  # a tensor one model left unchanged (all-zero task vector) ...
    models[1]["w"][::3] = base["w"][::3]  # ... and unchanged rows between changed ones
    got = merge_state_dicts(method, models, base=base, seed=7, **params)
    want_kernels = {"della": {"magprune_apply", "row_keys32"}, "dare_linear": {"combine_bf16"}}.get(
        method, {"combine_bf16", "window_bf16", "high_hist_bf16"} if params.get("ties_density", 0.2) < 1 else {"combine_bf16"})
    assert want_kernels <= set(seen), seen
    if method == "della":  # the task vectors are formed in the ranking pass, not by a subtraction of their own
        assert not {"sub", "sub_into"} & set(seen), seen
    want = on_torch_path(monkeypatch, lambda: merge_state_dicts(method, models, base=base, seed=7, **params))
    for k in shapes:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_reader_runs_ahead_within_its_bounds(tiny_zoo, monkeypatch):
    """The reader prefetches up to PREFETCH_UNITS units and PREFETCH_BYTES in all, in order; a unit bigger
    than PREFETCH_BYTES is read only when the consumer reaches it (never two big units held at once)."""
    import threading
    import time

    import mergesmith.engine as E

    z = tiny_zoo("llama")
    plan = plan_recipe(recipe("linear", None, [z["ft0"], z["ft1"]]))
    ex = E.Executor(plan, DictSink(plan))
    sizes = [10, 10, 10, 10, 50, 10, 30, 30, 10]  # bytes per unit (PREFETCH_BYTES = 40 below); 50 is big
    units = [E.Unit(plan.jobs[0], k, None) for k in range(len(sizes))]
    monkeypatch.setattr(E, "PREFETCH_BYTES", 40)
    monkeypatch.setattr(E, "_input_bytes", lambda u: sizes[u.chunk])
    lock, loaded, ahead_max, log = threading.Lock(), set(), [0], []
    consumed = [-1]

    def load(unit):
        with lock:
            loaded.add(unit.chunk)
            held = sorted(k for k in loaded if k > consumed[0])
            ahead_max[0] = max(ahead_max[0], len(held) - 1)  # besides the unit being consumed
            log.append((unit.chunk, consumed[0], threading.current_thread().name, sum(sizes[k] for k in held[1:])))
        time.sleep(0.002)
        return unit.chunk

    monkeypatch.setattr(ex, "_load", load)
    got = []
    for unit, data in ex._stream(units):
        assert data == unit.chunk
        with lock:
            consumed[0] = unit.chunk
        got.append(data)
        time.sleep(0.01)  # a slow consumer: the reader runs ahead as far as it may
    assert got == list(range(len(sizes)))
    assert ahead_max[0] <= E.PREFETCH_UNITS
    big = next(e for e in log if e[0] == 4)
    assert big[1] == 3 and not big[2].startswith("mergesmith-read")  # read when due, by the consumer
    prefetched = [e for e in log if e[2].startswith("mergesmith-read")]
    assert max(e[0] - e[1] for e in prefetched) > 1  # it did run more than one unit ahead
    assert max(e[3] for e in prefetched) <= 40  # the units read ahead never held more than the byte budget


def test_a_tied_input_lends_its_embedding_as_the_missing_lm_head(tmp_path):
    """An input with tied embeddings stores no lm_head.weight: where the output has one (an untied base), the
    input's embedding stands in for it (mergekit's tied_names); with tie_word_embeddings false it is an error."""
    import json as _json

    from conftest import build_model

    build_model("llama", 0).save_pretrained(tmp_path / "base")
    build_model("llama", 1, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    out = tmp_path / "out"
    run_recipe(recipe("task_arithmetic", tmp_path / "base", [tmp_path / "tied"], parameters={"lambda": 0.5}), out)
    b, t, got = load_state(tmp_path / "base"), load_state(tmp_path / "tied"), load_state(out)
    assert "lm_head.weight" not in t
    torch.testing.assert_close(got["lm_head.weight"], b["lm_head.weight"] + 0.5 * (t["model.embed_tokens.weight"] - b["lm_head.weight"]))
    cfg = _json.loads((tmp_path / "tied" / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "tied" / "config.json").write_text(_json.dumps(cfg))
    _bad(tmp_path, recipe("task_arithmetic", tmp_path / "base", [tmp_path / "tied"]), "tensor 'lm_head.weight' is missing")


def test_buffers_only_some_inputs_store_are_copied_from_the_reference(tmp_path):
    """Older checkpoints store computed buffers (rotary inv_freq, GPT-2's attn.bias mask) that newer ones do
    not: copied from the reference input with a warning instead of a missing-tensor error."""
    from safetensors.torch import load_file, save_file

    from conftest import build_model

    build_model("llama", 0).save_pretrained(tmp_path / "old")
    build_model("llama", 1).save_pretrained(tmp_path / "new")
    sd = load_file(tmp_path / "old" / "model.safetensors")
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv
    save_file(sd, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    plan = run_recipe(recipe("task_arithmetic", tmp_path / "old", [tmp_path / "new"]), tmp_path / "out")
    got = load_state(tmp_path / "out")
    assert torch.equal(got["model.layers.0.self_attn.rotary_emb.inv_freq"], inv)
    assert any("inv_freq: a buffer not every input stores" in w for w in plan.warnings)
    sd["model.layers.0.self_attn.q_proj.extra"] = torch.ones(2)  # not a known buffer: still an error
    save_file(sd, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    _bad(tmp_path, recipe("task_arithmetic", tmp_path / "old", [tmp_path / "new"]), "tensor 'model.layers.0.self_attn.q_proj.extra' is missing")


def test_cli_takes_mergekit_yaml_style_arguments(tiny_zoo, tmp_path, capsys):
    """`mergesmith merge recipe.yml out/` as `mergekit-yaml recipe.yml out/`, with its flag names for the
    shard size and the seed; one output folder only."""
    z = tiny_zoo("llama")
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe("dare_ties", z["base"], [z["ft0"], z["ft1"]],
                                                          parameters={"density": 0.5})))
    assert cli("merge", tmp_path / "r.yml", tmp_path / "a", "--random-seed", 7, "--out-shard-size", "20KB", "-q",
               "--copy-tokenizer", "--allow-crimes", "--lazy-unpickle") == 0
    assert cli("merge", tmp_path / "r.yml", "-o", tmp_path / "b", "--seed", 7, "--shard-size", "20KB", "-q") == 0
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1
    assert cli("merge", tmp_path / "r.yml") == 2
    assert "give the output folder" in capsys.readouterr().err
    assert cli("merge", tmp_path / "r.yml", tmp_path / "c", "-o", tmp_path / "d") == 2
    assert "two output folders" in capsys.readouterr().err


def test_inputs_in_different_float_dtypes_need_a_dtype(tmp_path):
    """bf16 + fp16 inputs without `dtype:`: a planning error naming the fix; with it, the merge runs."""
    from conftest import build_model

    build_model("llama", 0).to(torch.bfloat16).save_pretrained(tmp_path / "a")
    build_model("llama", 1).to(torch.float16).save_pretrained(tmp_path / "b")
    r = recipe("linear", None, [tmp_path / "a", tmp_path / "b"])
    _bad(tmp_path, r, r"dtype mismatch for '.*': inputs store bfloat16, float16; set `dtype:`")
    run_recipe({**r, "dtype": "float16"}, tmp_path / "out")
    assert all(t.dtype == torch.float16 for t in load_state(tmp_path / "out").values())


def test_frankenmerge_rebuilds_per_layer_config_lists(tmp_path):
    """Gemma2/Qwen2-style `layer_types` (one entry per layer) follow the slices' source layers, so the
    output config validates and loads; each output layer keeps its source layer's attention type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64)
    for s in range(2):
        torch.manual_seed(s)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"m{s}")
    types = cfg.layer_types
    out = tmp_path / "out"
    run_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "m0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tmp_path / "m1"), "layer_range": [1, 3]}]}]}, out)
    got = json.loads((out / "config.json").read_text())
    assert got["num_hidden_layers"] == 4
    assert got["layer_types"] == [types[0], types[1], types[1], types[2]]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_config_differences_between_inputs_are_warned(tmp_path):
    """Same shapes, different RoPE base / context length: the output takes the reference's config values,
    and says so (the weights cannot show it)."""
    from conftest import build_model

    build_model("llama", 0).save_pretrained(tmp_path / "a")
    build_model("llama", 1, rope_theta=500000.0, max_position_embeddings=128).save_pretrained(tmp_path / "b")
    plan = run_recipe(recipe("linear", None, [tmp_path / "a", tmp_path / "b"]), tmp_path / "out")
    text = "\n".join(plan.warnings)
    assert "config `max_position_embeddings` (128, 64)" in text and "500000" in text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_position_embeddings"] == 64
    plan = run_recipe(recipe("linear", None, [tmp_path / "a", tmp_path / "a"]), tmp_path / "same")
    assert not any("inputs differ in config" in w for w in plan.warnings)


def test_weights_summing_to_zero_at_some_layer_is_a_planning_error(tiny_zoo, tmp_path):
    """A weight gradient that makes the weights sum to 0 at one layer (normalize: true) is found in planning,
    with the tensor named, before any weight is read (it failed mid-merge before)."""
    z = tiny_zoo("llama")
    r = recipe("linear", None, [z["ft0"], z["ft1"]])
    r["models"][0]["parameters"] = {"weight": [1.0, 0.0]}
    r["models"][1]["parameters"] = {"weight": [0.0, 0.0]}
    _bad(tmp_path, r, r"linear: the weights sum to 0 with normalize=true.*\(at model\.layers\.2\.")
    t = recipe("task_arithmetic", z["base"], [z["ft0"], z["ft1"]], parameters={"normalize": True})
    t["models"][0]["parameters"] = {"weight": [1.0, -1.0]}
    t["models"][1]["parameters"] = {"weight": [0.0, 1.0]}
    _bad(tmp_path, t, r"task_arithmetic: the weights sum to 0.*\(at model\.layers\.2\.")


def test_installed_command_ends_without_teardown_and_keeps_exit_codes(tiny_zoo, tmp_path):
    """The console entry (``cli.console``) ends the process with os._exit after the command: the merged folder is
    complete, printed output is flushed, and the exit codes are the command's."""
    import subprocess
    import sys

    z = tiny_zoo("llama")
    recipe_file = tmp_path / "r.yml"
    recipe_file.write_text(yaml.safe_dump(recipe("linear", None, [z["ft0"], z["ft1"]])))
    entry = [sys.executable, "-c", "from mergesmith.cli import console; console()"]
    done = subprocess.run(entry + ["merge", str(recipe_file), str(tmp_path / "out"), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_state(tmp_path / "out").keys() == load_state(z["ft0"]).keys()
    shown = subprocess.run(entry + ["methods", "ram"], capture_output=True, text=True)
    assert shown.returncode == 0 and "Reinforced Agentic Models" in shown.stdout  # all of it, flushed
    bad = subprocess.run(entry + ["merge", str(tmp_path / "missing.yml"), str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: recipe not found" in bad.stderr
