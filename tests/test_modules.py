"""Multi-module models (tiny random Qwen2.5-VL and T5, built locally): a merge loads with transformers, a
per-layer gradient runs over each layer stack's own depth (text layers, vision blocks; encoder, decoder), as
mergekit's per-module layer counts do, and mergekit's `modules:` form merges each module with its own
models and parameters (modules.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import load_state
from mergesmith.run import run_recipe

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    try:
        cfg = transformers.AutoConfig.for_model(
            "qwen2_5_vl",
            text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                               fullatt_block_indexes=[1], window_size=16))
    except (KeyError, ValueError) as e:  # a transformers without Qwen2.5-VL
        pytest.skip(f"no qwen2_5_vl config here: {e}")
    root = tmp_path_factory.mktemp("vlm")
    for k in range(2):
        torch.manual_seed(k)
        transformers.AutoModelForImageTextToText.from_config(cfg).save_pretrained(root / f"m{k}")
    return root


def test_vlm_slerp_gradient_per_stack_and_output_loads(vlm, tmp_path):
    out = tmp_path / "out"
    run_recipe({"merge_method": "slerp", "base_model": str(vlm / "m0"), "models": [{"model": str(vlm / "m1")}],
                "parameters": {"t": [0.0, 1.0]}, "dtype": "float32"}, out)
    m0, m1, got = load_state(vlm / "m0"), load_state(vlm / "m1"), load_state(out)
    assert set(got) == set(m0)
    text = sorted({k.split(".layers.")[0] for k in got if ".layers." in k})
    assert len(text) == 1
    last_text = [k for k in got if k.startswith(f"{text[0]}.layers.2.") and k.endswith("weight")]
    first_text = [k for k in got if k.startswith(f"{text[0]}.layers.0.") and k.endswith("weight")]
    last_vision = [k for k in got if ".blocks.1." in k and k.endswith("weight")]
    assert last_text and first_text and last_vision
    for k in last_text + last_vision:  # t = 1 at each stack's last block (vision: 2 blocks, text: 3 layers)
        torch.testing.assert_close(got[k], m1[k])
    for k in first_text:
        torch.testing.assert_close(got[k], m0[k])
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 128)


def _modules(vlm, text=None, vision=None, projector=None):
    both = [{"model": str(vlm / "m0")}, {"model": str(vlm / "m1")}]
    mods = {
        "text_decoder": text or {"slices": [{"sources": [{"model": str(vlm / "m0"), "layer_range": [0, 3]},
                                                         {"model": str(vlm / "m1"), "layer_range": [0, 3]}]}],
                                 "parameters": {"t": [0.0, 1.0]}},
        "vision_tower": vision or {"models": both, "parameters": {"t": 1.0}},
        "multi_modal_projector": projector or {"models": both, "parameters": {"t": 0.0}},
    }
    return {"merge_method": "slerp", "base_model": str(vlm / "m0"), "dtype": "float32",
            "modules": {k: v for k, v in mods.items() if v != "-"}}


def test_modules_recipe_merges_each_module_with_its_own_parameters(vlm, tmp_path):
    """mergekit's `modules:` form (its documented VLM example: the text decoder as one full-range slice, the
    vision tower and projector as `models:`): each module takes its own parameters; the output loads.
    (Against mergekit 0.1.5 on this model: every tensor equal to 7.5e-9, docs/mergekit_parity.md.)"""
    out = tmp_path / "out"
    run_recipe(_modules(vlm), out)
    m0, m1, got = load_state(vlm / "m0"), load_state(vlm / "m1"), load_state(out)
    assert set(got) == set(m0)
    for k in got:
        if "visual.merger." in k:
            torch.testing.assert_close(got[k], m0[k])  # projector: t = 0
        elif "visual." in k:
            torch.testing.assert_close(got[k], m1[k])  # vision tower: t = 1
        elif ".layers.0." in k:
            torch.testing.assert_close(got[k], m0[k])  # text: the gradient over its own 3 layers
        elif ".layers.2." in k:
            torch.testing.assert_close(got[k], m1[k])
    transformers.AutoModelForImageTextToText.from_pretrained(out)


def test_modules_recipe_errors(vlm, tmp_path):
    from mergesmith.methods.base import MergeError

    bad = [
        (_modules(vlm, projector="-"), "tensors belong to none of the recipe's modules"),
        ({**_modules(vlm), "modules": {**_modules(vlm)["modules"], "vision_towr": {"models": [{"model": str(vlm / "m0")}]}}},
         "unknown module 'vision_towr'"),
        (_modules(vlm, vision={"slices": [{"sources": [{"model": str(vlm / "m0"), "layer_range": [0, 1]},
                                                      {"model": str(vlm / "m1"), "layer_range": [0, 1]}]}],
                               "parameters": {"t": 0.5}}),
         r"layer_range \[0, 1\] does not span its layer stack of 2"),
        (_modules(vlm, vision={"models": [{"model": str(vlm / "m0")}], "slices": []}), "exactly one of `models:` or `slices:`"),
        ({**_modules(vlm), "models": [{"model": str(vlm / "m0")}]}, "exactly one of `models:`, `slices:` or `modules:`"),
    ]
    for recipe, match in bad:
        with pytest.raises(MergeError, match=match):
            run_recipe(recipe, tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_top_level_slices_on_a_multi_stack_model_are_refused(vlm, tmp_path):
    """Top-level slices re-index every stack by the same layer numbers: on a VLM (text layers and vision blocks)
    that breaks the model, so it is a planning error pointing to `modules:` (mergekit refuses it too)."""
    from mergesmith.methods.base import MergeError

    with pytest.raises(MergeError, match="has several layer stacks .* give the stacks as `modules:`"):
        run_recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(vlm / "m0"), "layer_range": [0, 2]}]},
                                                              {"sources": [{"model": str(vlm / "m1"), "layer_range": [1, 3]}]}]},
                   tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_t5_modules_encoder_decoder_shared(tmp_path):
    """T5's modules (mergekit's t5 architecture): encoder, decoder and shared, each with its own parameters;
    the encoder's 2 blocks and the decoder's 3 each get their own gradient."""
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
                                num_heads=2)
    for k in range(2):
        torch.manual_seed(k)
        transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / f"m{k}")
    m0, m1 = str(tmp_path / "m0"), str(tmp_path / "m1")
    grad = [{"model": m0, "parameters": {"weight": [1.0, 0.0]}}, {"model": m1, "parameters": {"weight": [0.0, 1.0]}}]
    both = [{"model": m0}, {"model": m1}]
    out = tmp_path / "out"
    run_recipe({"merge_method": "linear", "dtype": "float32", "modules": {
        "encoder": {"models": grad}, "decoder": {"models": grad},
        "shared": {"models": both, "parameters": {"weight": 0.5}}}}, out)
    a, b, got = load_state(tmp_path / "m0"), load_state(tmp_path / "m1"), load_state(out)
    assert set(got) == set(a)
    for stack, last in (("encoder", 1), ("decoder", 2)):
        for k in got:
            if k.startswith(f"{stack}.block.0."):
                torch.testing.assert_close(got[k], a[k])
            elif k.startswith(f"{stack}.block.{last}."):
                torch.testing.assert_close(got[k], b[k])
    torch.testing.assert_close(got["shared.weight"], (a["shared.weight"] + b["shared.weight"]) / 2)
    model = transformers.T5ForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2]]), decoder_input_ids=torch.tensor([[0]])).logits.shape == (1, 1, 64)


def test_modules_warnings_once_and_paper_default_warning_sees_module_parameters(vlm):
    """A top-level parameter the method ignores is validated with every module's parameters: one warning, not
    one per module; parameters set in modules count as set for the paper-vs-mergekit warning."""
    from mergesmith.run import plan_recipe

    rec = _modules(vlm)
    rec["parameters"] = {"density": 0.5}  # not a slerp parameter (TIES's): ignored with a warning
    plan = plan_recipe(rec)
    assert sum("density" in w and "ignored" in w for w in plan.warnings) == 1
    mk = {"density": 1.0, "scope": "tensor", "exact_topk": True, "weighted_elect": True, "zero_sign": "positive",
          "normalize": True}
    ties = {"merge_method": "ties", "base_model": str(vlm / "m0"), "dtype": "float32",
            "modules": {m: {"models": [{"model": str(vlm / "m1")}], "parameters": dict(mk)}
                        for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    assert not any("paper's defaults" in w for w in plan_recipe(ties).warnings)
    for m in ties["modules"].values():
        del m["parameters"]["exact_topk"]
    w = [w for w in plan_recipe(ties).warnings if "paper's defaults" in w]
    assert len(w) == 1 and "exact_topk False" in w[0] and "density" not in w[0]


def test_vlm_inputs_in_both_transformers_layouts_merge(vlm, tmp_path):
    """A fine-tune saved in the current transformers layout (model.language_model.*, model.visual.*) merges with a
    base in the legacy one (model.*, visual.*): tensors matched by name layout (io.layouts), the output in the
    base's names, equal to the merge of the two legacy checkpoints."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    new = tmp_path / "m1_new"
    shutil.copytree(vlm / "m1", new)
    sd = load_file(str(new / "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else
               ("model." + k) if k.startswith("visual.") else k: v for k, v in sd.items()}
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, str(new / "model.safetensors"), metadata={"format": "pt"})
    assert "vision_config" in json.loads((new / "config.json").read_text())
    rec = {"merge_method": "task_arithmetic", "base_model": str(vlm / "m0"), "dtype": "float32",
           "models": [{"model": str(vlm / "m1"), "parameters": {"weight": 0.5}}]}
    run_recipe(rec, tmp_path / "legacy")
    rec["models"][0]["model"] = str(new)
    run_recipe(rec, tmp_path / "mixed")
    a, b = load_state(tmp_path / "legacy"), load_state(tmp_path / "mixed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("legacy, current", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.1.fc1.weight", "model.vision_tower.vision_model.encoder.layers.1.fc1.weight"),
    ("multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.weight"),
    ("model.layers.2.self_attn.q_proj.weight", "model.language_model.layers.2.self_attn.q_proj.weight"),
    ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
    ("lm_head.weight", "lm_head.weight"),
])
def test_layout_canonical_names(legacy, current):
    from mergesmith.io.layouts import canonical

    assert canonical(legacy) == current and canonical(current) == current


def test_text_decoder_frankenmerge_inside_modules(vlm, tmp_path):
    """A frankenmerge of a VLM's text decoder (`modules: {text_decoder: {slices: ...}}`): text layers
    rebuilt from the slices, the vision tower and projector merged as given, text_config.num_hidden_layers
    follows; the output loads. Other modules' stacks are not rebuilt (clear error)."""
    import json

    from mergesmith.methods.base import MergeError

    m0, m1 = str(vlm / "m0"), str(vlm / "m1")
    rec = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m0, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": m1, "layer_range": [1, 3]}]}]},
        "vision_tower": {"models": [{"model": m0}]},
        "multi_modal_projector": {"models": [{"model": m0}]}}}
    out = tmp_path / "out"
    run_recipe(rec, out)
    a, b, got = load_state(vlm / "m0"), load_state(vlm / "m1"), load_state(out)
    text = sorted({k.split(".layers.")[0] for k in a if ".layers." in k})[0]
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in got if k.startswith(text + ".layers.")} == {0, 1, 2, 3}
    for k in a:
        if k.startswith(f"{text}.layers.1."):
            torch.testing.assert_close(got[k], a[k])
            torch.testing.assert_close(got[k.replace(".layers.1.", ".layers.2.")], b[k])  # m1's layer 1 at 2
        elif "visual." in k:
            torch.testing.assert_close(got[k], a[k])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4 and cfg["vision_config"]["depth"] == 2
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 128)
    rec["modules"]["vision_tower"] = {"slices": [{"sources": [{"model": m0, "layer_range": [0, 1]}]},
                                                 {"sources": [{"model": m1, "layer_range": [0, 2]}]}]}
    with pytest.raises(MergeError, match="supported for the text decoder only"):
        run_recipe(rec, tmp_path / "never")


VLM = ["text_decoder", "vision_tower", "multi_modal_projector"]


@pytest.mark.parametrize("name, module", [
    ("model.layers.0.self_attn.q_proj.weight", "text_decoder"),  # Qwen2-VL, legacy names
    ("visual.blocks.3.attn.qkv.weight", "vision_tower"),
    ("visual.merger.mlp.0.weight", "multi_modal_projector"),
    ("model.language_model.layers.0.mlp.up_proj.weight", "text_decoder"),  # Qwen2.5-VL, current names
    ("model.visual.merger.ln_q.weight", "multi_modal_projector"),
    ("model.visual.deepstack_merger_list.1.norm.weight", "multi_modal_projector"),  # Qwen3-VL
    ("lm_head.weight", "text_decoder"),
    ("language_model.model.embed_tokens.weight", "text_decoder"),  # LLaVA / Gemma 3 / Mistral 3, legacy
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision_tower"),
    ("multi_modal_projector.mm_input_projection_weight", "multi_modal_projector"),
    ("model.vision_tower.vision_model.post_layernorm.weight", "vision_tower"),  # current
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector"),
    ("model.connector.modality_projection.proj.weight", "multi_modal_projector"),  # Idefics3 / SmolVLM
    ("model.vision_model.encoder.layers.0.self_attn.k_proj.weight", "vision_tower"),
])
def test_module_of_real_vlm_names(name, module):
    from mergesmith.modules import module_of

    assert module_of(name, VLM) == module


@pytest.mark.parametrize("name, module", [
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder"),  # T5
    ("decoder.block.1.layer.1.EncDecAttention.k.weight", "decoder"),
    ("shared.weight", "shared"),
    ("lm_head.weight", "shared"),
    ("model.encoder.conv1.weight", "encoder"),  # Whisper
    ("model.decoder.embed_positions.weight", "decoder"),
])
def test_module_of_encoder_decoder_names(name, module):
    from mergesmith.modules import module_of

    assert module_of(name, ["encoder", "decoder", "shared"]) == module
