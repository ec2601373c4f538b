"""Adapter merges end to end with the real peft library: merged adapters load with
PeftModel.from_pretrained unchanged and give the expected outputs; into-base folders load with
transformers; results match PEFT's own add_weighted_adapter where PEFT is correct."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from lora_helpers import expected_sum, logits_with_adapter, logits_with_state, make_adapter, peft_merged
from typer.testing import CliRunner

from mergesmith.lora import merge_adapters, merge_adapters_into_base
from mergesmith.lora.adapter import open_adapter
from mergesmith.lora.cli import register
from mergesmith.methods.base import MergeError

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def zoo(tiny_zoo, tmp_path_factory):
    base = tiny_zoo("llama", num_hidden_layers=2)["base"]
    root = tmp_path_factory.mktemp("lora_merge")
    return {
        "base": base,
        # different ranks, alpha != r, rsLoRA, different target modules (union with zeros)
        "a": make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(base, root / "b", 2, r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "o_proj"]),
        # equal ranks, alpha != r, no rsLoRA: comparable with PEFT's add_weighted_adapter
        "c": make_adapter(base, root / "c", 3, r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
        "d": make_adapter(base, root / "d", 4, r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]),
    }


@pytest.mark.parametrize("method,kw", [("cat", {}), ("svd", {"rank": 6})])
def test_exact_methods_load_in_peft(zoo, tmp_path, method, kw):
    w = [0.7, -1.3]
    merge_adapters([zoo["a"], zoo["b"]], tmp_path / "m", weights=w, method=method, **kw)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"] and not cfg["use_rslora"]
    expected = logits_with_state(zoo["base"], expected_sum(zoo["base"], [zoo["a"], zoo["b"]], w), IDS)
    torch.testing.assert_close(logits_with_adapter(zoo["base"], tmp_path / "m", IDS), expected, rtol=1e-4, atol=1e-5)


def test_embedding_lora_rank_pattern_and_modules_to_save(zoo, tmp_path):
    e = make_adapter(zoo["base"], tmp_path / "e", 11, r=4, lora_alpha=8, use_rslora=True,
                     target_modules=["q_proj", "embed_tokens"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                     modules_to_save=["lm_head"])
    merged = merge_adapters([zoo["a"], e], tmp_path / "m", method="cat", weights=[1.0, 0.5])
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    # ranks: q 4+4 (layer 0), 4+2 (layer 1), v 4, embed_tokens 4; scaling 1 everywhere
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 6}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["modules_to_save"] == ["lm_head"]
    assert {m.kind for m in merged.modules} == {"linear", "embedding"}
    # lm_head is replaced, not weighted: expected_sum adds 0.5 * (copy - W0), so set it to the copy
    exp_state = expected_sum(zoo["base"], [zoo["a"], e], [1.0, 0.5])
    exp_state["lm_head.weight"] = open_adapter(e).replacement("lm_head.weight")
    expected = logits_with_state(zoo["base"], exp_state, IDS)
    torch.testing.assert_close(logits_with_adapter(zoo["base"], tmp_path / "m", IDS), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["cat", "svd", "lego"])
def test_single_adapter_weight_one_is_identity(zoo, tmp_path, method):
    """Catches alpha / rsLoRA scaling applied twice (or not at all)."""
    merged = merge_adapters([zoo["b"]], tmp_path / "m", method=method)
    assert {m.rank for m in merged.modules} == {2}
    ref = peft_merged(zoo["base"], zoo["b"])
    got = peft_merged(zoo["base"], tmp_path / "m")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def _peft_weighted(zoo, names, weights, combination, **kw):
    """ΔW per module of PEFT's add_weighted_adapter result."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), str(zoo[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(zoo[n]), adapter_name=n)
    pm.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kw)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "merged" in mod.lora_A:
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("merged").detach()
    return out


@pytest.mark.parametrize("ours,peft_type,kw", [
    ("linear", "linear", {}),
    ("cat", "cat", {}),
    ("svd", "svd", {}),
    ("ties", "ties_svd", {"density": 0.5}),
    ("magnitude_prune", "magnitude_prune_svd", {"density": 0.4}),
    ("factorwise_ties", "ties", {"density": 0.5}),
    ("factorwise_magnitude_prune", "magnitude_prune", {"density": 0.4}),
])
def test_matches_peft_add_weighted_adapter(zoo, ours, peft_type, kw):
    w = [0.6, 1.5]
    ref = _peft_weighted(zoo, ["c", "d"], w, peft_type, **kw)
    merged = merge_adapters([zoo["c"], zoo["d"]], None, weights=w, method=ours, **kw)
    assert merged.config["lora_alpha"] == merged.config["r"]
    assert set(ref) == {m.name for m in merged.modules}
    for m in merged.modules:
        torch.testing.assert_close(m.B @ m.A, ref[m.name], rtol=1e-4, atol=1e-5, msg=m.name)


def test_dare_is_seeded_and_loads(zoo, tmp_path):
    kw = dict(weights=[1.0, 1.0], method="dare_ties", density=0.5, rank=4)
    m1 = merge_adapters([zoo["c"], zoo["d"]], tmp_path / "m1", seed=7, **kw)
    m2 = merge_adapters([zoo["c"], zoo["d"]], None, seed=7, **kw)
    m3 = merge_adapters([zoo["c"], zoo["d"]], None, seed=8, **kw)
    assert all(torch.equal(x.A, y.A) for x, y in zip(m1.modules, m2.modules))
    assert not all(torch.equal(x.A, y.A) for x, y in zip(m1.modules, m3.modules))
    assert torch.isfinite(logits_with_adapter(zoo["base"], tmp_path / "m1", IDS)).all()


def test_into_base_writes_a_full_model(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    w = [0.5, 2.0]
    out = merge_adapters_into_base(zoo["base"], [zoo["a"], zoo["b"]], tmp_path / "full", weights=w, method="cat")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = m(IDS).logits
    expected = logits_with_state(zoo["base"], expected_sum(zoo["base"], [zoo["a"], zoo["b"]], w), IDS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_into_base_ties_uses_the_dense_merge(zoo, tmp_path):
    from safetensors.torch import load_file

    from mergesmith.lora.combine import CombineOptions, dense_delta

    merge_adapters_into_base(zoo["base"], [zoo["c"], zoo["d"]], tmp_path / "full", method="ties", density=0.3)
    got = load_file(tmp_path / "full" / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    c, d = open_adapter(zoo["c"]), open_adapter(zoo["d"])
    name = "model.layers.1.self_attn.q_proj"
    delta = dense_delta(CombineOptions("ties", [1.0, 1.0], density=0.3), name, [c.factors(name), d.factors(name)])
    torch.testing.assert_close(got[f"{name}.weight"], base[f"{name}.weight"] + delta, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_adapters(tiny_zoo, tmp_path):
    base = tiny_zoo("gpt2", n_layer=2)["base"]
    a = make_adapter(base, tmp_path / "a", 5, r=4, lora_alpha=8, target_modules=["c_attn"])
    b = make_adapter(base, tmp_path / "b", 6, r=3, lora_alpha=3, target_modules=["c_attn", "c_fc"])
    merge_adapters([a, b], tmp_path / "m", method="cat")
    expected = logits_with_state(base, expected_sum(base, [a, b], [1.0, 1.0]), IDS)
    torch.testing.assert_close(logits_with_adapter(base, tmp_path / "m", IDS), expected, rtol=1e-4, atol=1e-5)


def test_modules_to_save_conflicts(zoo, tmp_path):
    base = zoo["base"]
    x = make_adapter(base, tmp_path / "x", 7, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    y = make_adapter(base, tmp_path / "y", 8, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(MergeError, match="both replace 'lm_head.weight'"):
        merge_adapters([x, y], None, method="cat")
    merged = merge_adapters([x, y], tmp_path / "m", method="cat", modules_to_save="average", weights=[1.0, 3.0])
    lx, ly = open_adapter(x).replacement("lm_head.weight"), open_adapter(y).replacement("lm_head.weight")
    torch.testing.assert_close(merged.extra["base_model.model.lm_head.weight"], (lx + 3 * ly) / 4)
    assert merged.config["modules_to_save"] == ["lm_head"]
    assert torch.isfinite(logits_with_adapter(base, tmp_path / "m", IDS)).all()


def test_errors(zoo, tiny_zoo, tmp_path):
    with pytest.raises(MergeError, match="2 adapter\\(s\\) but 3 weight"):
        merge_adapters([zoo["a"], zoo["b"]], None, weights=[1, 2, 3])
    other = tiny_zoo("llama", num_hidden_layers=2, hidden_size=48, intermediate_size=64)["base"]
    z = make_adapter(other, tmp_path / "z", 9, r=2, target_modules=["q_proj"])
    with pytest.raises(MergeError, match="not for the same base model"):
        merge_adapters([zoo["a"], z], None, method="cat")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_adapters([zoo["a"]], tmp_path / "busy")
    merge_adapters([zoo["a"]], tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "z"]  # no temporary folders left


def test_cli_lora_merge(zoo, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["lora-merge", str(zoo["a"]), str(zoo["b"]), "-o", str(tmp_path / "m"), "-m", "cat",
                              "-w", "0.5", "-w", "1.5"])
    assert res.exit_code == 0, res.output
    assert "6 module(s), rank 2..6" in res.output  # q: 4, o: 2, v: 4 + 2
    expected = logits_with_state(zoo["base"], expected_sum(zoo["base"], [zoo["a"], zoo["b"]], [0.5, 1.5]), IDS)
    torch.testing.assert_close(logits_with_adapter(zoo["base"], tmp_path / "m", IDS), expected, rtol=1e-4, atol=1e-5)
    res = runner.invoke(app, ["lora-merge", str(zoo["a"]), "-o", str(tmp_path / "f"), "--into-base", "--base", str(zoo["base"])])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f" / "model.safetensors").exists()
    res = runner.invoke(app, ["lora-merge", str(zoo["a"]), "-o", str(tmp_path / "e"), "-m", "tiez"])
    assert res.exit_code == 2 and "error: unknown LoRA merge method 'tiez'" in res.output
    res = runner.invoke(app, ["lora-merge", str(zoo["a"]), "-o", str(tmp_path / "e"), "-m", "ties"])
    assert res.exit_code == 2 and "needs a density" in res.output
    assert not (tmp_path / "e").exists()
