"""The zoo: tiny variants built in seconds; signal properties, caching, determinism, HF loading."""
from __future__ import annotations

import json

import pytest
import torch
from _bench_util import tiny_zoo

from mergesmith.bench import zoo as zoo_mod
from mergesmith.methods.base import MergeError


@pytest.mark.parametrize("family", ["classify", "bytegpt"])
def test_experts_beat_base_on_their_own_task(family):
    z = tiny_zoo(family)
    better = (lambda a, b: a > b) if z.family.higher_is_better else (lambda a, b: a < b)
    base = z.evaluate(z.state_dict("base"))
    for t in z.tasks:
        own = z.evaluate(z.state_dict(t))
        assert better(own[t], base[t]), (t, own[t], base[t])
        # specialisation: an expert is better on its own task than any other expert is
        for other in z.tasks:
            if other != t:
                assert better(own[t], z.evaluate(z.state_dict(other))[t]), (t, other)
    mt = z.evaluate(z.state_dict("multitask"))
    assert better(sum(mt.values()), sum(base.values()))


def test_manifest_and_folders_are_complete():
    z = tiny_zoo("classify")
    m = json.loads((z.root / "zoo.json").read_text())
    assert m["complete"] and m["family"] == "classify" and m["size"] == "tiny" and m["tasks"] == z.tasks
    for which in ["base", "multitask", *z.tasks]:
        folder = z.path(which)
        assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert z.root.parent.name == "zoo" and z.root.name == "classify-v1-tiny"
    with pytest.raises(MergeError, match="no model"):
        z.path("nope")


def test_cache_is_reused_and_a_broken_cache_is_rebuilt(monkeypatch):
    z = tiny_zoo("classify")
    monkeypatch.setenv("MERGESMITH_CACHE", str(z.root.parent.parent))
    calls = []
    real = zoo_mod.build_zoo
    monkeypatch.setattr(zoo_mod, "build_zoo", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = zoo_mod.get_zoo("classify", size="tiny")
    assert calls == [] and again.manifest == z.manifest
    # a zoo folder without its manifest is not trusted
    manifest = z.root / "zoo.json"
    saved = manifest.read_text()
    manifest.write_text("{}")
    try:
        assert zoo_mod._valid(z.root) is None
    finally:
        manifest.write_text(saved)
    assert zoo_mod._valid(z.root) is not None


def test_build_is_deterministic(tmp_path, monkeypatch):
    fam = zoo_mod.get_family("classify")
    micro = dict(fam.sizes["tiny"], tasks=["shapes", "digits"], n_train=256, n_val=64, pre_steps=5,
                 probe_steps=5, ft_steps=5, mt_steps=5)
    monkeypatch.setitem(fam.sizes, "micro", micro)
    a = zoo_mod.get_zoo("classify", size="micro", root=tmp_path / "a")
    b = zoo_mod.get_zoo("classify", size="micro", root=tmp_path / "b")
    c = zoo_mod.get_zoo("classify", size="micro", seed=1, root=tmp_path / "c")
    for which in ["base", "shapes", "digits", "multitask"]:
        sa, sb, sc = a.state_dict(which), b.state_dict(which), c.state_dict(which)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not list(tmp_path.glob(".*building*"))  # temp folders are renamed away


def test_bytegpt_folders_load_with_transformers():
    from transformers import AutoModelForCausalLM

    z = tiny_zoo("bytegpt")
    model = AutoModelForCausalLM.from_pretrained(z.path("json"))
    ids = torch.tensor([list(b'{"id": 1')])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 256)
    # the evaluator sees the same numbers as a model loaded by transformers
    from mergesmith.bench.zoo_bytegpt import _loss

    val = z.evaluator.val["json"]
    with torch.no_grad():
        ref = float(_loss(model.eval(), val))
    assert z.evaluate(z.state_dict("json"))["json"] == pytest.approx(ref, rel=1e-5)


def test_unknown_zoo_and_size():
    with pytest.raises(MergeError, match="unknown zoo"):
        zoo_mod.get_zoo("imagenet")
    with pytest.raises(MergeError, match="no size"):
        zoo_mod.get_zoo("classify", size="huge")


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path))
    fam = zoo_mod.get_family("bytegpt")
    assert zoo_mod.zoo_dir(fam) == tmp_path / "zoo" / "bytegpt-v1"
    assert zoo_mod.zoo_dir(fam, "tiny", 3) == tmp_path / "zoo" / "bytegpt-v1-tiny-seed3"
    monkeypatch.delenv("MERGESMITH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo_mod.cache_root() == tmp_path / "xdg" / "mergesmith"
