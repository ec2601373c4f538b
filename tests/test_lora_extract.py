"""extract-lora: truncated SVD of each weight delta, written as a PEFT adapter; full rank reconstructs the
fine-tune, reported errors equal an independent SVD."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from lora_helpers import logits_with_adapter
from typer.testing import CliRunner

from mergesmith.lora import extract_lora
from mergesmith.lora.adapter import open_adapter
from mergesmith.lora.cli import register
from mergesmith.methods.base import MergeError

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return m(IDS).logits


@pytest.fixture(scope="module")
def llama(tiny_zoo):
    return tiny_zoo("llama", num_hidden_layers=2)


def test_full_rank_round_trip_llama(llama, tmp_path):
    """Every tensor of ft0 changed (norms and embeddings too: saved in full)."""
    rep = extract_lora(llama["ft0"], llama["base"], tmp_path / "ad", rank=64)
    assert rep.modules and max(m.rel_error for m in rep.modules) < 1e-5
    assert "model.embed_tokens" in rep.modules_to_save and "model.norm" in rep.modules_to_save
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (tmp_path / "ad" / "extract_report.json").exists()
    torch.testing.assert_close(logits_with_adapter(llama["base"], tmp_path / "ad", IDS), _logits(llama["ft0"]),
                               rtol=1e-4, atol=1e-5)


def test_low_rank_errors_match_independent_svd(llama, tmp_path):
    from safetensors.torch import load_file

    ft = load_file(llama["ft1"] / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    rep = extract_lora(llama["ft1"], llama["base"], tmp_path / "ad", rank=3, embed_lora=True, skip_undecomposable=True)
    assert "model.embed_tokens" in {m.module for m in rep.modules} and rep.dropped
    ad = open_adapter(tmp_path / "ad")
    for m in rep.modules:
        delta = ft[f"{m.module}.weight"] - base[f"{m.module}.weight"]
        oriented = delta.T if m.kind == "embedding" else delta
        s = torch.linalg.svdvals(oriented)
        ref = (s[3:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
        assert m.rank == 3 and m.rel_error == pytest.approx(ref, rel=1e-3)
        got = ad.factors(m.module).delta()
        assert (torch.linalg.matrix_norm(oriented - got) / torch.linalg.matrix_norm(oriented)).item() == pytest.approx(ref, rel=1e-3)


def test_randomized_svd_is_close_to_exact(llama):
    kw = dict(rank=3, include=["self_attn"])
    exact = {m.module: m.rel_error for m in extract_lora(llama["ft1"], llama["base"], None, **kw).modules}
    rand = extract_lora(llama["ft1"], llama["base"], None, svd_method="randomized", **kw).modules
    assert len(rand) == len(exact) == 8
    for m in rand:
        assert exact[m.module] - 1e-4 <= m.rel_error <= exact[m.module] * 1.05


def test_sv_epsilon_and_filters(llama, tmp_path):
    rep = extract_lora(llama["ft0"], llama["base"], None, rank=64, sv_epsilon=1e9, include=["q_proj"], exclude=["layers\\.1\\."])
    assert [m.module for m in rep.modules] == ["model.layers.0.self_attn.q_proj"]
    assert rep.modules[0].rank == 1  # every singular value is below epsilon: one is kept


def test_gpt2_conv1d_with_bias(tiny_zoo, tmp_path):
    """Conv1D weights are in x out; bias deltas become lora_B.bias (lora_bias). The tied wte is kept fixed:
    PEFT cannot tie a changed GPT-2 embedding to the LM head."""
    from transformers import AutoModelForCausalLM

    base = tiny_zoo("gpt2", n_layer=2)["base"]
    m = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "wte" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    m.save_pretrained(tmp_path / "ft")
    rep = extract_lora(tmp_path / "ft", base, tmp_path / "ad", rank=128)
    assert {r.kind for r in rep.modules} == {"conv1d"}
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["lora_bias"]
    assert "transformer.wpe" in rep.modules_to_save
    torch.testing.assert_close(logits_with_adapter(base, tmp_path / "ad", IDS), _logits(tmp_path / "ft"), rtol=1e-4, atol=1e-5)


def test_tied_embed_tokens_stays_tied(tiny_zoo, tmp_path):
    zoo = tiny_zoo("llama", num_hidden_layers=2, tie_word_embeddings=True)
    rep = extract_lora(zoo["ft0"], zoo["base"], tmp_path / "ad", rank=64)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] and "model.embed_tokens" in rep.modules_to_save
    torch.testing.assert_close(logits_with_adapter(zoo["base"], tmp_path / "ad", IDS), _logits(zoo["ft0"]), rtol=1e-4, atol=1e-5)


def test_errors(llama, tmp_path):
    with pytest.raises(MergeError, match="nothing to extract"):
        extract_lora(llama["base"], llama["base"], None)
    with pytest.raises(MergeError, match="rank must be >= 1"):
        extract_lora(llama["ft0"], llama["base"], None, rank=0)


def test_cli_extract_lora(llama, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["extract-lora", str(llama["ft0"]), "--base", str(llama["base"]), "-o", str(tmp_path / "ad"), "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "model.layers.0.self_attn.q_proj" in res.output and "rel. error" in res.output
    report = json.loads((tmp_path / "ad" / "extract_report.json").read_text())
    assert 0 < report["mean_rel_error"] < 1
    res = runner.invoke(app, ["extract-lora", str(llama["ft0"]), "--base", str(llama["base"]), "-o", str(tmp_path / "ad")])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["extract-lora", str(tmp_path / "nope"), "--base", str(llama["base"]), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error: model not found" in res.output
