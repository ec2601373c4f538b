"""The state folder through the CLI on tiny safetensors models: round trip, user errors, crash safety
(injected failures leave the previous state usable), locking, and constant state size."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from _continual_util import save_sd, tiny_sd
from mergesmith.continual import ContinualMerger
from mergesmith.continual import api as capi
from mergesmith.continual import state as cstate
from mergesmith.continual.cli import register
from mergesmith.methods.base import MergeError


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(*args, code=0):
        res = runner.invoke(app, ["continual", *map(str, args)])
        assert res.exit_code == code, res.output
        return res.output

    return run


@pytest.fixture()
def zoo(tmp_path):
    base = tiny_sd(0)
    paths = {"base": save_sd(base, tmp_path / "base" / "model.safetensors").parent}
    (paths["base"] / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "float32"}))
    (paths["base"] / "tokenizer_config.json").write_text("{}")
    for i in range(4):
        paths[i] = save_sd(tiny_sd(100 + i, base), tmp_path / f"ft{i}.safetensors")
    return paths


def _export(cli, state, out):
    cli("export", state, "-o", out, "-q")
    return load_file(out / "model.safetensors")


def test_cli_round_trip(cli, zoo, tmp_path):
    state = tmp_path / "state"
    out = cli("init", state, "--base", zoo["base"], "-m", "opcm", "-p", "alpha=0.4", "--seed", "3")
    assert "opcm" in out and '"alpha": 0.4' in out
    out = cli("add", state, zoo[0], zoo[1])
    assert "added #1" in out and "added #2" in out and "lambda_t" in out
    st = json.loads(cli("status", state, "--json"))
    assert st["count"] == 2 and st["params"]["alpha"] == 0.4 and st["seed"] == 3 and st["order_dependent"]
    assert [h["source"] for h in st["history"]] == [str(zoo[0]), str(zoo[1])]
    assert "models:  2" in cli("status", state)
    merged = _export(cli, state, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()
    prov = json.loads((tmp_path / "out" / "mergesmith_continual.json").read_text())
    assert prov["count"] == 2 and prov["method"] == "opcm"
    # the same merge in memory, and through the one-shot method
    from mergesmith import merge_state_dicts

    direct = merge_state_dicts("opcm", [str(zoo[0]), str(zoo[1])], base=str(zoo["base"]), alpha=0.4)
    for k in direct:
        assert torch.allclose(merged[k], direct[k], atol=1e-5), k
    # manifest history records header hashes
    man = json.loads((state / (state / "CURRENT").read_text().strip() / "manifest.json").read_text())
    assert man["history"][0]["identity"]["files"][0]["header_sha256"]
    assert man["base"]["identity"]["files"][0]["header_sha256"]


def test_cli_user_errors(cli, zoo, tmp_path):
    state = tmp_path / "s"
    assert "not a continual-merge state" in cli("add", state, zoo[0], code=2)
    assert "unknown continual method" in cli("init", state, "--base", zoo["base"], "-m", "nope", code=2)
    assert "NAME=VALUE" in cli("init", state, "--base", zoo["base"], "-p", "alpha", code=2)
    cli("init", state, "--base", zoo["base"])
    assert "already holds" in cli("init", state, "--base", zoo["base"], code=2)
    assert "no model has been added" in cli("export", state, "-o", tmp_path / "o", code=2)
    assert "model not found" in cli("add", state, tmp_path / "missing.safetensors", code=2)
    bad = tiny_sd(0)
    bad["layers.0.q.weight"] = torch.zeros(3, 3)
    assert "has shape [3, 3]" in cli("add", state, save_sd(bad, tmp_path / "bad.safetensors"), code=2)
    extra = dict(tiny_sd(1, tiny_sd(0)), extra=torch.ones(2))
    assert "'extra' is not in the base" in cli("add", state, save_sd(extra, tmp_path / "x.safetensors"), code=2)
    cli("add", state, zoo[0], "-q")
    assert "same weights as input #1" in cli("add", state, zoo[0], code=2)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    assert "not empty" in cli("export", state, "-o", tmp_path / "o", code=2)
    cli("export", state, "-o", tmp_path / "o", "--overwrite", "-q")
    assert "unknown dtype" in cli("export", state, "-o", tmp_path / "o2", "--dtype", "int3", code=2)
    assert json.loads(cli("status", state, "--json"))["count"] == 1
    # never create or wipe folders that are not states
    assert "not a continual-merge state" in cli("export", tmp_path / "nowhere", "-o", tmp_path / "o3", code=2)
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not a continual state" in cli("init", tmp_path / "mine", "--base", zoo["base"], "--overwrite", code=2)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_base_change_is_detected(cli, zoo, tmp_path):
    state = tmp_path / "s"
    cli("init", state, "--base", zoo["base"])
    cli("add", state, zoo[0], "-q")
    bigger = dict(tiny_sd(0), more=torch.zeros(4))
    save_sd(bigger, zoo["base"] / "model.safetensors")
    assert "changed since" in cli("add", state, zoo[1], code=2)


def test_export_dtype_and_shards(cli, zoo, tmp_path):
    state = tmp_path / "s"
    cli("init", state, "--base", zoo["base"], "-m", "task_arithmetic")
    cli("add", state, zoo[0], zoo[1], "-q")
    out = tmp_path / "o"
    cli("export", state, "-o", out, "--dtype", "bfloat16", "--shard-size", "300", "-q")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    t = load_file(out / index["weight_map"]["layers.0.q.weight"])["layers.0.q.weight"]
    assert t.dtype == torch.bfloat16


def _snapshot(cm):
    return {k: v.clone() for k, v in cm.state_dict().items()}


def test_failure_during_add_keeps_previous_state(zoo, tmp_path, monkeypatch):
    cm = ContinualMerger(tmp_path / "s")
    cm.init(zoo["base"], method="opcm")
    cm.add(zoo[0])
    cm.add(zoo[1])
    before = _snapshot(cm)
    calls = {"n": 0}
    real = capi.ShardedWriter.write

    def flaky(self, name, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (injected)")
        return real(self, name, tensor, *a, **k)

    monkeypatch.setattr(capi.ShardedWriter, "write", flaky)
    with pytest.raises(OSError, match="injected"):
        cm.add(zoo[2])
    monkeypatch.undo()
    assert cm.status()["count"] == 2
    after = _snapshot(cm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "s").iterdir())
    cm.add(zoo[2])  # the state is still usable
    assert cm.status()["count"] == 3


def test_crash_between_rename_and_pointer_update(zoo, tmp_path, monkeypatch):
    cm = ContinualMerger(tmp_path / "s")
    cm.init(zoo["base"], method="ties")
    cm.add(zoo[0])
    before = _snapshot(cm)
    real_replace = cstate.os.replace

    def crash(src, dst):
        if str(dst).endswith("CURRENT"):
            raise KeyboardInterrupt("power cut (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(cstate.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cm.add(zoo[1])
    monkeypatch.undo()
    fresh = ContinualMerger(tmp_path / "s")  # as a new process would see it
    assert fresh.status()["count"] == 1
    assert all(torch.equal(before[k], v) for k, v in _snapshot(fresh).items())
    fresh.add(zoo[1])  # cleans the orphaned version and goes on
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith("."))
    assert names == ["CURRENT", "v000002"]
    assert fresh.status()["count"] == 2


def test_concurrent_writer_is_refused(zoo, tmp_path):
    cm = ContinualMerger(tmp_path / "s")
    cm.init(zoo["base"])
    with cm.folder.lock():
        with pytest.raises(MergeError, match="busy"):
            ContinualMerger(tmp_path / "s").add(zoo[0])


@pytest.mark.parametrize("method", ["opcm", "average"])
def test_state_size_is_constant_in_number_of_models(zoo, tmp_path, method):
    cm = ContinualMerger(tmp_path / "s")
    cm.init(zoo["base"] if method != "average" else None, method=method)
    sizes, manifests = [], []
    for i in range(4):
        cm.add(zoo[i])
        vdir = cm.folder.version_dir()
        sizes.append(sum(p.stat().st_size for p in (vdir / "tensors").rglob("*") if p.is_file()))
        manifests.append((vdir / "manifest.json").stat().st_size)
    assert len(set(sizes)) == 1  # tensor state: one float32 copy, whatever the number of models
    growth = [b - a for a, b in zip(manifests, manifests[1:])]
    assert max(growth) < 1500  # one history line per model
    assert len([p for p in (tmp_path / "s").iterdir() if p.name.startswith("v")]) == 1


@pytest.mark.parametrize("method", ["opcm", "average", "task_arithmetic"])
def test_row_chunked_streaming_gives_the_same_state(zoo, tmp_path, monkeypatch, method):
    def fold(name):
        cm = ContinualMerger(tmp_path / name)
        cm.init(zoo["base"] if method != "average" else None, method=method)
        for i in range(3):
            cm.add(zoo[i])
        return cm

    whole = fold("whole")
    monkeypatch.setattr(capi, "CHUNK_BYTES", 50)  # two rows of 6 floats per chunk
    assert len(capi.row_chunks((11, 6))) == 6
    chunked = fold("chunked")
    a, b = whole.state_dict(), chunked.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "o"
    chunked.export(out)
    assert all(torch.equal(a[k], v) for k, v in load_file(out / "model.safetensors").items())
    with pytest.raises(MergeError, match="same weights"):  # content hash does not depend on chunking
        chunked.add(zoo[0])
    h1 = [h["content_blake2b"] for h in whole.folder.manifest()["history"]]
    assert h1 == [h["content_blake2b"] for h in chunked.folder.manifest()["history"]]


def test_parallel_workers_give_identical_state(zoo, tmp_path):
    def fold(name, workers):
        cm = ContinualMerger(tmp_path / name, workers=workers)
        cm.init(zoo["base"], method="opcm")
        for i in range(3):
            cm.add(zoo[i])
        return cm

    a, b = fold("seq", 1), fold("par", 2)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.folder.manifest()["scalars"] == b.folder.manifest()["scalars"]
    assert torch.get_num_threads() >= 1
