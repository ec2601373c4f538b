"""Continual baselines: running average == plain average, continual TA == batch TA, continual TIES ==
the official loop (whole-model trim, global majority sign, disjoint sum, added on top)."""
from __future__ import annotations

import pytest
import torch

from _continual_util import ref_continual_ties, tiny_sd
from mergesmith import merge_state_dicts
from mergesmith.continual import ContinualMerger
from mergesmith.methods.base import MergeError


def _fold(tmp_path, method, base, models, **params):
    cm = ContinualMerger(tmp_path / method)
    cm.init(base, method=method, **params)
    for m in models:
        cm.add(m)
    return cm.state_dict()


def test_running_average_equals_plain_average(tmp_path):
    models = [tiny_sd(60 + i, tiny_sd(0), scale=1.0) for i in range(5)]
    got = _fold(tmp_path, "average", None, models)
    for k, v in got.items():
        if v.is_floating_point():
            want = torch.stack([m[k].double() for m in models]).mean(0)
            assert torch.allclose(v.double(), want, atol=1e-6), k
        else:
            assert torch.equal(v, models[0][k])
    soup = merge_state_dicts("linear", models)
    assert all(torch.allclose(got[k], soup[k], atol=1e-6) for k in got if got[k].is_floating_point())


def test_continual_task_arithmetic_equals_batch(tmp_path):
    base = tiny_sd(0)
    models = [tiny_sd(70 + i, base) for i in range(4)]
    got = _fold(tmp_path, "task_arithmetic", base, models, **{"lambda": 0.3})
    batch = merge_state_dicts("task_arithmetic", models, base=base, **{"lambda": 0.3})
    for k in got:
        assert torch.allclose(got[k], batch[k], atol=1e-6), k
        want = base[k].double() + 0.3 * sum(m[k].double() - base[k].double() for m in models) if base[k].is_floating_point() else base[k]
        assert torch.allclose(got[k].double(), want.double(), atol=1e-6), k


def test_continual_ta_default_lambda_is_paper_value(tmp_path):
    base = tiny_sd(0)
    m = tiny_sd(1, base)
    got = _fold(tmp_path, "task_arithmetic", base, [m])
    w = "layers.0.q.weight"
    assert torch.allclose(got[w], base[w] + 0.3 * (m[w] - base[w]), atol=1e-6)


@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_continual_ties_matches_official_loop(tmp_path, agg):
    base = tiny_sd(0)
    models = [tiny_sd(80 + i, base) for i in range(4)]
    got = _fold(tmp_path, "ties", base, models, agg=agg)
    want = ref_continual_ties(base, models, lam=0.5, density=0.2, merge_func=agg)
    for k in want:
        assert torch.allclose(got[k].double(), want[k], atol=1e-6), k
    assert torch.equal(got["position_ids"], base["position_ids"])


def test_continual_ties_differs_from_batch_ties(tmp_path):
    base = tiny_sd(0)
    models = [tiny_sd(90 + i, base) for i in range(3)]
    got = _fold(tmp_path, "ties", base, models)
    batch = merge_state_dicts("ties", models, base=base, density=0.2, agg="sum", **{"lambda": 0.5})
    w = "layers.0.up.weight"
    assert not torch.allclose(got[w], batch[w], atol=1e-4)


def test_bad_parameters_are_user_errors(tmp_path):
    with pytest.raises(MergeError, match="unknown parameter 'alpah'.*alpha"):
        ContinualMerger(tmp_path / "a").init(tiny_sd(0), method="opcm", alpah=0.3)
    with pytest.raises(MergeError, match="not a valid float"):
        ContinualMerger(tmp_path / "b").init(tiny_sd(0), method="ties", density="lots")
    with pytest.raises(MergeError, match="needs a base"):
        ContinualMerger(tmp_path / "c").init(None, method="task_arithmetic")
    with pytest.raises(MergeError, match="unknown continual method"):
        ContinualMerger(tmp_path / "d").init(tiny_sd(0), method="dare")
