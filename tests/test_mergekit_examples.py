"""mergekit's own example recipes run unchanged (`tests/data/mergekit_examples`): their repo ids resolve to
tiny local Llamas placed in a temporary Hugging Face cache; every output loads with transformers."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _tokenizer, build_model, cli, perturb

EXAMPLES = Path(__file__).parent / "data" / "mergekit_examples"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding a 40-layer tiny Llama (enough for the examples' layer ranges) under every
    repo id the examples use, each a different perturbation of one base."""
    root = tmp_path_factory.mktemp("hub")
    ids = set()
    for f in EXAMPLES.glob("*.yml"):
        ids |= set(re.findall(r"model:\s*([\w./-]+)", f.read_text()))
    kw = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=40, num_attention_heads=2, num_key_value_heads=1)
    for k, repo in enumerate(sorted(ids)):
        model = build_model("llama", 0, **kw)
        if k:
            perturb(model, 100 + k)
        snap = root / ("models--" + repo.replace("/", "--")) / "snapshots" / ("%040x" % (k + 1))
        model.save_pretrained(snap)
        _tokenizer(snap, model.config.vocab_size)
        (snap.parents[1] / "refs").mkdir(exist_ok=True)
        (snap.parents[1] / "refs" / "main").write_text("%040x" % (k + 1))
    return root


@pytest.mark.parametrize("defaults", ["paper", "mergekit"])
@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yml")))
def test_example_runs_unchanged(example, defaults, hub, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    docs = list(yaml.safe_load_all((EXAMPLES / example).read_text()))
    recipe = next((d for d in docs if "name" not in d), docs[-1])  # a multi-stage file: its final merge
    assert cli("merge", EXAMPLES / example, tmp_path / "out", "-q", "--defaults", defaults) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    if recipe["merge_method"] == "passthrough":  # 24 + 20 layers
        assert model.config.num_hidden_layers == 44
    assert model.dtype == getattr(torch, recipe.get("dtype", "float32"))
    if len(docs) > 1:
        assert sorted(p.name for p in (tmp_path / "out-stages").iterdir()) == sorted(d["name"] for d in docs if "name" in d)
    shutil.rmtree(tmp_path / "out")
