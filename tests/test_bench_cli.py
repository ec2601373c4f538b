"""The demo, bench and inspect commands end to end on tiny zoos; report folders and their HTML."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from _bench_util import cache_root, tiny_zoo
from typer.testing import CliRunner

from mergesmith.cli import _attach_plugins, app

_attach_plugins()
runner = CliRunner()


@pytest.fixture()
def cache(monkeypatch):
    tiny_zoo("classify")  # built once per session
    monkeypatch.setenv("MERGESMITH_CACHE", str(cache_root()))
    return cache_root()


def _html_images_exist(folder):
    html = (folder / "index.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert srcs, "the HTML shows no image"
    for s in srcs:
        assert (folder / s).is_file() and (folder / s).stat().st_size > 1000, s
    return srcs


def test_demo_prints_the_table_and_writes_the_report(cache, tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "reusing the cached zoo" in r.output
    for word in ["base", "experts (own task)", "multi-task", "linear", "task_arithmetic", "ties", "norm."]:
        assert word in r.output
    assert "lambda=0.3" in r.output  # the no-validation defaults are shown
    res = json.loads((out / "results.json").read_text())
    labels = [x["label"] for x in res["runs"] if x["status"] == "ok"]
    assert labels[:3] == ["linear", "task_arithmetic", "ties"] and len(labels) >= 4
    assert set(_html_images_exist(out)) >= {"per_task.png", "normalized.png"}
    md = (out / "results.md").read_text()
    assert "| model | parameters |" in md and "experts (each on its own task)" in md
    # running again replaces the previous report
    r = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output


def test_bench_with_sweep_and_recipe(cache, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("merge_method: ties\nparameters: {density: 0.5, lambda: 0.5}\n")
    out = tmp_path / "bench"
    args = ["bench", "--zoo", "classify", "--size", "tiny", "--methods", f"average,ta,{recipe}",
            "--sweep", "lambda=0.2:0.6:0.2", "--seed", "3", "--out", str(out), "-q"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3 and res["sweep"] == {"param": "lambda", "values": [0.2, 0.4, 0.6]}
    labels = [x["label"] for x in res["runs"]]
    assert labels == ["average", "ta lambda=0.2", "ta lambda=0.4", "ta lambda=0.6", "mine"]
    assert set(_html_images_exist(out)) == {"per_task.png", "normalized.png", "sweep.png"}
    assert "oracle-tuned" in (out / "results.md").read_text()
    # same seed, same numbers
    out2 = tmp_path / "bench2"
    r = runner.invoke(app, args[:-3] + ["--out", str(out2), "-q"])
    assert r.exit_code == 0, r.output
    res2 = json.loads((out2 / "results.json").read_text())
    assert [x["scores"] for x in res2["runs"]] == [x["scores"] for x in res["runs"]]


def test_inspect_zoo_and_paths(cache, tmp_path):
    z = tiny_zoo("classify")
    out = tmp_path / "insp"
    experts = [str(p) for p in z.expert_paths()]
    r = runner.invoke(app, ["inspect", *experts, "--base", str(z.path("base")), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Cosine similarity" in r.output and "Sign conflicts" in r.output and "layer 0" in r.output
    _html_images_exist(out)
    res = json.loads((out / "inspect.json").read_text())
    assert res["models"] == z.tasks and res["tensors"] > 0
    r = runner.invoke(app, ["inspect", "--zoo", "classify", "--size", "tiny", "--out", str(tmp_path / "i2")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["bench", "--size", "tiny", "--methods", "nosuchmethod"], "unknown merge method"),
    (["bench", "--size", "tiny", "--sweep", "lambda=1:0:1"], "bad --sweep"),
    (["bench", "--zoo", "imagenet"], "unknown zoo"),
    (["inspect", "a", "b"], "--base"),
    (["inspect", "nowhere", "--base", "nothing"], "model not found"),
])
def test_user_errors_are_one_line(cache, tmp_path, args, message):
    r = runner.invoke(app, args + ["--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert f"error: " in r.output and message in r.output
    assert "Traceback" not in r.output


def test_refuses_to_replace_a_folder_that_is_not_a_report(cache, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    r = runner.invoke(app, ["demo", "--size", "tiny", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "not a mergesmith report" in r.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_command_module_imports_no_heavy_packages():
    code = ("import sys, mergesmith.cli as c; c._attach_plugins(); import mergesmith.bench.cli; "
            "print([m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_skips_unregistered_slots_with_a_note(monkeypatch):
    from mergesmith.bench import demo

    monkeypatch.setattr(demo, "DEMO_SLOTS", [("average", ["linear"]), ("future", ["no_such_method_yet"])])
    names, notes = demo.demo_entries()
    assert names == ["linear"]
    assert notes == ["future: skipped, none of no_such_method_yet is registered in this build"]
