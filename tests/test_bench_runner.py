"""Bench runner: entry/sweep parsing, merging through the API, scoring, reproducibility, recipes."""
from __future__ import annotations

import math

import pytest
import torch
from _bench_util import tiny_zoo

from mergesmith.bench import evaluate, runner
from mergesmith.methods.base import MergeError


def test_parse_entries():
    es = runner.parse_entries(["average, ta:lambda=0.5:weight=2", "ties:density=0.3,dare_linear:rescale=l1"])
    assert [e.method for e in es] == ["linear", "task_arithmetic", "ties", "dare_linear"]
    assert es[0].label == "average" and es[0].params == {}
    assert es[1].params == {"lambda": 0.5, "weight": 2}
    assert es[2].params == {"density": 0.3} and es[3].params == {"rescale": "l1"}
    with pytest.raises(MergeError, match="unknown merge method"):
        runner.parse_entries(["tiess"])
    with pytest.raises(MergeError, match="key=value"):
        runner.parse_entries(["ties:density"])
    with pytest.raises(MergeError, match="recipe not found"):
        runner.parse_entries(["missing.yml"])
    with pytest.raises(MergeError, match="no methods"):
        runner.parse_entries([" , "])


def test_parse_sweep():
    assert runner.parse_sweep("lambda=0.1:1.0:0.1") == ("lambda", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert runner.parse_sweep("density=0.2,0.5") == ("density", [0.2, 0.5])
    assert runner.parse_sweep(None) is None
    for bad in ["lambda", "lambda=1:0:0.1", "lambda=0:1:0", "lambda=a,b", "lambda=0:1000:1"]:
        with pytest.raises(MergeError):
            runner.parse_sweep(bad)


def test_defaults_follow_spec_and_user_values_win():
    e = runner.parse_entries(["ties:lambda=0.7"])[0]
    params, note = runner.method_params(e)
    assert params == {"density": 0.2, "lambda": 0.7} and note == ""
    ta, _ = runner.method_params(runner.parse_entries(["task_arithmetic"])[0])
    assert ta == {"lambda": 0.3}


def test_expand_sweep():
    es = runner.expand_sweep(runner.parse_entries(["ta,linear"]), ("lambda", [0.0, 1.0]))
    assert [(e.label, e.params, e.sweep_value, e.group) for e in es[:2]] == [
        ("ta lambda=0", {"lambda": 0.0}, 0.0, "ta"), ("ta lambda=1", {"lambda": 1.0}, 1.0, "ta")]
    assert es[2].method == "linear" and es[2].sweep_value is None and "no 'lambda'" in es[2].note


def test_normalized_scores_by_hand():
    assert evaluate.normalized(True, 0.45, 0.3, 0.9) == pytest.approx(0.5)
    assert evaluate.normalized(False, 2.5, 3.0, 2.0) == pytest.approx(0.5)  # half of the expert's gain
    assert evaluate.normalized(False, 3.5, 3.0, 2.0) == pytest.approx(-0.5)
    assert math.isnan(evaluate.normalized(False, 1.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def classify_results():
    z = tiny_zoo("classify")
    entries = runner.parse_entries(["average,ties,dare_linear:density=0.5"])
    entries += runner.expand_sweep(runner.parse_entries(["task_arithmetic"]), ("lambda", [0.0, 1.0]))
    return z, runner.run_bench(z, entries, seed=0)


def test_average_matches_a_hand_computed_average(classify_results):
    z, res = classify_results
    base = z.state_dict("base")
    experts = [z.state_dict(t) for t in z.tasks]
    ref = {k: sum(e[k] for e in experts) / len(experts) for k in base}
    got = next(r for r in res["runs"] if r["label"] == "average")
    assert got["status"] == "ok" and got["scores"] == z.evaluate(ref)
    # reference rows: experts' own-task scores and a normalized score of exactly 1 for them
    assert res["references"]["experts"] == {t: z.evaluate(e)[t] for t, e in zip(z.tasks, experts)}


def test_task_arithmetic_sweep_endpoints(classify_results):
    z, res = classify_results
    runs = {r["label"]: r for r in res["runs"]}
    # lambda = 0 gives the base model exactly; lambda = 1 with one task vector per expert is their sum
    assert runs["task_arithmetic lambda=0"]["scores"] == res["references"]["base"]
    assert runs["task_arithmetic lambda=0"]["normalized_average"] == pytest.approx(
        res["reference_rows"]["base"]["normalized_average"])
    base = z.state_dict("base")
    experts = [z.state_dict(t) for t in z.tasks]
    ref = {k: base[k] + sum(e[k] - base[k] for e in experts) for k in base}
    assert runs["task_arithmetic lambda=1"]["scores"] == pytest.approx(z.evaluate(ref), abs=1e-6)


def test_merges_land_between_base_and_experts(classify_results):
    z, res = classify_results
    checks = evaluate.quality_checks(z, res["references"], [r for r in res["runs"] if r["label"] in ("average", "ties")])
    assert all(checks["expert_beats_base"].values())
    assert checks["merge_between_base_and_experts"] == {"average": True, "ties": True}


def test_results_are_reproducible_with_a_seed(classify_results):
    z, res = classify_results
    dare = [runner.parse_entries(["dare_linear:density=0.5"])[0]]
    again = runner.run_bench(z, dare, seed=0, refs=res["references"])["runs"][0]
    first = next(r for r in res["runs"] if r["method"] == "dare_linear")
    assert again["scores"] == first["scores"]
    base = z.state_dict("base")
    experts = [z.state_dict(t) for t in z.tasks]
    a, _ = runner.merge_entry(dare[0], z, base, experts, seed=0)
    b, _ = runner.merge_entry(dare[0], z, base, experts, seed=1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_recipe_entry_fills_in_the_zoo_models(tmp_path, classify_results):
    z, res = classify_results
    (tmp_path / "avg.yml").write_text("merge_method: linear\n")
    (tmp_path / "one.yml").write_text(
        "merge_method: task_arithmetic\nbase_model: '{zoo}/base'\nmodels:\n  - model: '{zoo}/experts/%s'\n"
        "parameters:\n  lambda: 1.0\n" % z.tasks[0])
    out = runner.run_bench(z, runner.parse_entries([str(tmp_path / "avg.yml"), str(tmp_path / "one.yml")]),
                           refs=res["references"])
    avg = next(r for r in res["runs"] if r["label"] == "average")
    assert out["runs"][0]["status"] == "ok"
    assert out["runs"][0]["scores"] == pytest.approx(avg["scores"], abs=1e-6)
    assert out["runs"][1]["scores"] == pytest.approx(z.evaluate(z.state_dict(z.tasks[0])), abs=1e-6)


def test_methods_that_cannot_run_are_reported_not_raised(classify_results):
    z, res = classify_results
    out = runner.run_bench(z, runner.parse_entries(["slerp", "linear:weight=0"]), refs=res["references"])
    slerp, bad = out["runs"]
    assert slerp["status"] == "skipped" and "experts" in slerp["note"]
    assert bad["status"] == "failed" and "sum to 0" in bad["note"]


def test_bytegpt_bench_loss_metric():
    z = tiny_zoo("bytegpt")
    res = runner.run_bench(z, runner.parse_entries(["average,ties"]))
    assert res["metric"] == "loss" and not res["higher_is_better"]
    for r in res["runs"]:
        assert r["status"] == "ok"
        assert set(r["scores"]) == set(z.tasks)
        assert all(0 < v < 6 for v in r["scores"].values())
    # normalized score of the base itself is 0 and of the experts 1 by definition
    assert res["reference_rows"]["base"]["normalized_average"] == pytest.approx(0.0)
