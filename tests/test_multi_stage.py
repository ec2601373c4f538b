"""Multi-stage recipes (mergekit-multi's format): several YAML documents, later stages use earlier ones by name."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import cli, load_state
from mergesmith.methods.base import MergeError
from mergesmith.run import run_recipe


def _docs(z):
    a = {"name": "stage_a", "merge_method": "task_arithmetic", "base_model": str(z["base"]),
         "models": [{"model": str(z["ft0"]), "parameters": {"weight": 0.5}}], "dtype": "float32"}
    b = {"name": "stage_b", "merge_method": "linear", "models": [{"model": str(z["ft1"])}, {"model": str(z["ft2"])}],
         "dtype": "float32"}
    final = {"merge_method": "slerp", "base_model": "stage_a", "models": [{"model": "stage_a"}, {"model": "stage_b"}],
             "parameters": {"t": 0.3}, "dtype": "float32"}
    return a, b, final


def test_stages_run_in_order_and_equal_the_merges_run_one_by_one(tiny_zoo, tmp_path):
    z = tiny_zoo("llama")
    a, b, final = _docs(z)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([final, b, a]))  # the final first: the order comes from the references
    res = run_recipe(path, tmp_path / "out")
    assert [line.split(":")[0] for line in res.lines] == ["stage stage_a", "stage stage_b", "stage final"]
    one = {k: v for k, v in a.items() if k != "name"}
    two = {k: v for k, v in b.items() if k != "name"}
    run_recipe(one, tmp_path / "a")
    run_recipe(two, tmp_path / "b")
    ref = {**final, "base_model": str(tmp_path / "a"), "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]}
    run_recipe(ref, tmp_path / "ref")
    got, want = load_state(tmp_path / "out"), load_state(tmp_path / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "out-stages" / "stage_a" / "config.json").exists()
    # a second run keeps the built stages (mergekit-multi's --lazy) and rebuilds the final with --overwrite
    stamp = (tmp_path / "out-stages" / "stage_a" / "model.safetensors").stat().st_mtime_ns
    assert cli("merge", path, tmp_path / "out", "--overwrite", "-q") == 0
    assert (tmp_path / "out-stages" / "stage_a" / "model.safetensors").stat().st_mtime_ns == stamp


def test_dry_run_lists_the_stages_and_errors_come_first(tiny_zoo, tmp_path, capsys):
    z = tiny_zoo("llama")
    a, b, final = _docs(z)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([a, b, final]))
    assert cli("merge", path, tmp_path / "out", "--dry-run", "-I", tmp_path / "st") == 0
    text = capsys.readouterr().out
    assert "stage stage_a" in text and "stage stage_b" in text and "planned once the stages it uses are built" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "st").exists()
    bad = [({**a, "models": [{"model": "stage_b"}]}, {**b, "models": [{"model": "stage_a"}, {"model": str(z["ft1"])}]}, final),
           (a, {**b, "name": "stage_a"}, final),
           (a, {**b, "merge_method": "dare-tiez"}, final),
           (a, {k: v for k, v in b.items() if k != "name"}, final),
           (a, {**b, "models": [{"model": str(tmp_path / "nowhere")}, {"model": str(z["ft1"])}]}, final)]
    for docs, match in zip(bad, ["cycle", "used twice", "unknown merge method", "at most one unnamed", "model not found"]):
        path.write_text(yaml.safe_dump_all(list(docs)))
        with pytest.raises(MergeError, match=match):
            run_recipe(path, tmp_path / "never")
        assert not (tmp_path / "never").exists() and not (tmp_path / "never-stages").exists()
