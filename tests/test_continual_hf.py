"""Continual merging of tiny Hugging Face models (Llama: hidden 32, 2 layers, vocab 64; GPT-2 with tied
embeddings and Conv1D weights): CLI init/add/export, the folder loads with from_pretrained and equals the
one-shot ``opcm`` merge of the same models in the same order."""
from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from mergesmith import merge_state_dicts
from mergesmith.continual import ContinualMerger
from mergesmith.continual.cli import register


@pytest.mark.parametrize("arch,kw", [("llama", {"num_hidden_layers": 2}), ("gpt2", {})])  # gpt2: the shared zoo
def test_hf_round_trip_loads_with_from_pretrained(tiny_zoo, tmp_path, arch, kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = tiny_zoo(arch, **kw)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    state, out = tmp_path / "state", tmp_path / "merged"
    for args in (["init", state, "--base", zoo["base"], "-p", "alpha=0.5"],
                 ["add", state, zoo["ft0"], zoo["ft1"], zoo["ft2"]],
                 ["export", state, "-o", out]):
        res = runner.invoke(app, ["continual", *map(str, args)])
        assert res.exit_code == 0, res.output

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w7") == 7
    expected = ContinualMerger(state).state_dict()
    sd = merged.state_dict()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    one_shot = merge_state_dicts("opcm", [str(zoo[f"ft{i}"]) for i in range(3)], base=str(zoo["base"]))
    for k, v in one_shot.items():
        assert torch.allclose(expected[k], v, atol=1e-5), k
    base = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        logits = merged(ids).logits
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, base(ids).logits)
