"""Reading PEFT adapter folders and applying them to their base (``model+adapter`` inputs), checked
against PEFT's own merge_and_unload on tiny Llama / GPT-2 models."""
from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import expected_sum, make_adapter, peft_merged

from mergesmith.io.checkpoint import open_checkpoint
from mergesmith.lora.adapter import open_adapter
from mergesmith.lora.apply import open_model_with_adapter
from mergesmith.methods.base import MergeError


@pytest.fixture(scope="module")
def llama(tiny_zoo, tmp_path_factory):
    zoo = tiny_zoo("llama", num_hidden_layers=2)
    root = tmp_path_factory.mktemp("lora_adapter")
    base = zoo["base"]
    ads = {
        # alpha != r, rsLoRA, a rank/alpha pattern, an embedding LoRA and a modules_to_save copy
        "rich": make_adapter(base, root / "rich", 1, r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"layers.1.self_attn.q_proj": 3}, modules_to_save=["lm_head"]),
        "plain": make_adapter(base, root / "plain", 2, r=2, lora_alpha=5, target_modules=["q_proj", "o_proj"]),
    }
    return {"base": base, "root": root, **ads}


def test_reads_modules_scales_and_patterns(llama):
    a = open_adapter(llama["rich"])
    q0 = a.modules["model.layers.0.self_attn.q_proj"]
    q1 = a.modules["model.layers.1.self_attn.q_proj"]
    v0 = a.modules["model.layers.0.self_attn.v_proj"]
    emb = a.modules["model.embed_tokens"]
    assert (q0.rank, q0.scale) == (4, pytest.approx(8 / 2))  # rsLoRA: alpha / sqrt(r)
    assert (q1.rank, q1.scale) == (4, pytest.approx(3 / 2))  # alpha_pattern
    assert (v0.rank, v0.scale) == (2, pytest.approx(8 / 2 ** 0.5))  # rank_pattern
    assert emb.kind == "embedding" and emb.in_features == 64 and emb.out_features == 32
    assert set(a.replacements) == {"lm_head.weight", "model.embed_tokens.weight"}


def test_apply_equals_peft_merge_and_unload(llama):
    for name in ("rich", "plain"):
        ck = open_model_with_adapter(llama["base"], llama[name])
        ref = peft_merged(llama["base"], llama[name])
        for k in ck.keys():
            torch.testing.assert_close(ck.get(k), ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_row_chunks_equal_full_tensor(llama):
    ck = open_model_with_adapter(llama["base"], llama["rich"])
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        full = ck.get(k)
        torch.testing.assert_close(torch.cat([ck.get(k, (0, 5)), ck.get(k, (5, full.shape[0]))]), full)


def test_open_checkpoint_forms(llama):
    ref = f"{llama['base']}+{llama['plain']}"
    ck = open_checkpoint(ref)
    expected = peft_merged(llama["base"], llama["plain"])
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(ck.get(name), expected[name])
    with pytest.raises(MergeError, match=r"PEFT LoRA adapter, not a model: give it as 'BASE\+"):
        open_checkpoint(str(llama["plain"]))
    ck2 = open_checkpoint(str(llama["plain"]), base=str(llama["base"]))
    torch.testing.assert_close(ck2.get(name), expected[name])
    chained = open_checkpoint(f"{llama['base']}+{llama['plain']}+{llama['rich']}")  # W0 + ΔW_plain + ΔW_rich
    both = expected_sum(llama["base"], [llama["plain"], llama["rich"]], [1.0, 1.0])
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        torch.testing.assert_close(chained.get(k), both[k], rtol=1e-5, atol=1e-6)


def test_recipe_with_adapter_inputs(llama, tmp_path):
    """A recipe's model+adapter references go through the engine like any model."""
    from mergesmith.run import run_recipe
    from safetensors.torch import load_file

    base, a, b = str(llama["base"]), str(llama["plain"]), str(llama["rich"])
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": f"{base}+{a}", "parameters": {"weight": 0.5}},
                         {"model": {"model": {"path": base}, "lora": {"path": b}}, "parameters": {"weight": 1.0}}]}
    run_recipe(recipe, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    exp = expected_sum(base, [a, b], [0.5, 1.0])
    for k, v in got.items():
        torch.testing.assert_close(v, exp[k], rtol=1e-5, atol=1e-5, msg=k)


def _write_adapter_like(src, dst, **config_changes):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "IA3 adapter"),
    ({"init_lora_weights": "pissa_niter_4"}, "changes the base weights"),
    ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
    ({"rank_pattern": {"q_proj": 3}}, "rank 2 in the file but 3"),
])
def test_refuses_unsupported_adapters(llama, tmp_path, change, message):
    bad = _write_adapter_like(llama["plain"], tmp_path / "bad", **change)
    with pytest.raises(MergeError, match=message):
        open_adapter(bad)


def test_refuses_dora_tensors_and_bad_folders(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(llama["plain"] / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    d = _write_adapter_like(llama["plain"], tmp_path / "dora")
    save_file(sd, d / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="lora_magnitude_vector"):
        open_adapter(d)
    with pytest.raises(MergeError, match="not a PEFT adapter folder"):
        open_adapter(llama["base"])
    with pytest.raises(MergeError, match="adapter not found"):
        open_adapter(tmp_path / "missing")


def test_adapter_for_another_model_is_refused(llama, tiny_zoo, tmp_path):
    other = tiny_zoo("llama", num_hidden_layers=2, hidden_size=48, intermediate_size=64)
    with pytest.raises(MergeError, match="does not fit the base weight"):
        open_model_with_adapter(other["base"], llama["plain"])


def test_gpt2_conv1d_and_lora_bias(tiny_zoo, tmp_path):
    """GPT-2's Conv1D weights are stored in x out (fan_in_fan_out); lora_bias adds s·b to the bias."""
    base = tiny_zoo("gpt2", n_layer=2)["base"]
    ad = make_adapter(base, tmp_path / "g", 3, r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], lora_bias=True)
    a = open_adapter(ad)
    assert a.fan_in_fan_out and a.modules["transformer.h.0.attn.c_attn"].bias_key
    ck = open_model_with_adapter(base, ad)
    ref = peft_merged(base, ad)
    for k in ck.keys():
        torch.testing.assert_close(ck.get(k), ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_conv2d_lora(tmp_path):
    """Conv LoRA: A is r x in x k x k, B is out x r x 1 x 1; ΔW = (B A) reshaped to the kernel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from mergesmith.lora.apply import AdaptedCheckpoint
    from mergesmith.lora.combine import CombineOptions
    from mergesmith.lora.merge import merge_adapters

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.head = torch.nn.Conv2d(5, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    base_sd = Net().state_dict()
    folders = []
    for i, r in enumerate((3, 2)):
        net = Net()
        net.load_state_dict(base_sd)
        pm = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["conv", "head"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape) * 0.2)
        pm.save_pretrained(tmp_path / f"c{i}")
        folders.append(tmp_path / f"c{i}")

    def merged_state(folder):
        net = Net()
        net.load_state_dict(base_sd)
        return PeftModel.from_pretrained(net, str(folder)).merge_and_unload().state_dict()

    expected = {k: v + sum(merged_state(f)[k] - v for f in folders) for k, v in base_sd.items()}
    ck = AdaptedCheckpoint(open_checkpoint(base_sd), [open_adapter(f) for f in folders], CombineOptions("cat", [1.0, 1.0]))
    for k in base_sd:
        torch.testing.assert_close(ck.get(k), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    merge_adapters(folders, tmp_path / "m", method="svd", rank=5)
    got = merged_state(tmp_path / "m")
    for k in base_sd:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
