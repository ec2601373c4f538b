"""Repo ids (``org/name[@revision]``) as model references, found in the local Hugging Face cache (no network)."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import load_state
from mergesmith.io import hub_cache
from mergesmith.methods.base import MergeError
from mergesmith.run import run_recipe


def _cache_model(root, repo, src, commit="0123abcd" * 5, refs=("main",)):
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    shutil.copytree(src, snap)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for r in refs:
        (folder / "refs" / r).write_text(commit)
    return snap


def test_repo_ids_open_from_the_cache(tiny_zoo, tmp_path, monkeypatch):
    z = tiny_zoo("llama")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _cache_model(cache, "org/base", z["base"])
    _cache_model(cache, "org/ft", z["ft0"], commit="f" * 40, refs=("main", "v1"))
    assert hub_cache.resolve("org/ft@v1") == cache / "models--org--ft" / "snapshots" / ("f" * 40)
    assert hub_cache.resolve("org/ft@" + "f" * 40) == hub_cache.resolve("org/ft")
    assert hub_cache.resolve("org/ft@nope") is None and hub_cache.resolve("org/missing") is None
    out = tmp_path / "out"
    run_recipe({"merge_method": "task_arithmetic", "base_model": "org/base",
                "models": [{"model": {"model": {"path": "org/ft", "revision": "v1"}}, "parameters": {"weight": 0.5}}]}, out)
    b, f, got = load_state(z["base"]), load_state(z["ft0"]), load_state(out)
    for k in b:
        torch.testing.assert_close(got[k], b[k] + 0.5 * (f[k] - b[k]))
    assert (out / "tokenizer.json").exists()  # from the base's snapshot
    assert "base_model: org/base" in (out / "README.md").read_text()


def test_local_paths_win_and_unknown_ids_fail_clearly(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert hub_cache.local_path("org/none") == tmp_path.joinpath("org/none").relative_to(tmp_path)
    with pytest.raises(MergeError, match="model not found: org/none .*Hugging Face cache"):
        run_recipe({"merge_method": "linear", "models": [{"model": "org/none"}, {"model": "org/none2"}]}, tmp_path / "o")


def test_model_plus_adapter_ids_from_the_cache(tiny_zoo, tmp_path, monkeypatch):
    """mergekit's ``org/model+org/lora`` reference, both parts repo ids in the cache."""
    from lora_helpers import make_adapter, peft_merged

    z = tiny_zoo("llama")
    adapter = make_adapter(z["base"], tmp_path / "adapter", seed=3, target_modules=["q_proj", "v_proj"], r=2)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _cache_model(cache, "org/base", z["base"])
    _cache_model(cache, "org/lora", adapter, commit="a" * 40)
    out = tmp_path / "out"
    run_recipe({"merge_method": "linear", "models": [{"model": "org/base+org/lora"}], "dtype": "float32"}, out)
    want = peft_merged(z["base"], adapter)
    got = load_state(out)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
