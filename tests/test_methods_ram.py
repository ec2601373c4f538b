"""RAM / RAM+ (Yuan et al. 2026, arXiv 2601.13572): golden values, an element-by-element reference, identity
cases, the per-tensor and whole-model overlap counts, errors."""
from __future__ import annotations

import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.methods.base import MergeError

BASE = {"w": torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])}
M1 = {"w": torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 3.0]])}
M2 = {"w": torch.tensor([[3.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]])}


def test_ram_golden():
    # changes: (0,0) by both -> mean 2; (0,2), (1,3) by model 1 only, (0,3) by model 2 only -> kept whole
    out = merge_state_dicts("ram", [M1, M2], base=BASE)["w"]
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 2.0, 4.0], [1.0, 1.0, 1.0, 3.0]]))


@pytest.mark.parametrize("method", ["ramplus_tl", "ramplus"])
def test_ramplus_golden(method):
    # model 1: 1 shared, 2 unique -> rho 0.5, lambda 1 + 0.5 * 0.5 = 1.25; model 2: 1 and 1 -> lambda 1.5
    out = merge_state_dicts(method, [M1, M2], base=BASE, r=0.5, alpha=1.0)["w"]
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 2.5, 6.0], [1.0, 1.0, 1.0, 3.5]]))
    capped = merge_state_dicts(method, [M1, M2], base=BASE, r=0.5, alpha=0.2)["w"]  # both rho capped at 0.2
    assert torch.equal(capped, torch.tensor([[2.0, 0.0, 2.2, 4.4], [1.0, 1.0, 1.0, 3.2]]))


def reference(base, models, epsilon, scope=None, r=0.0, alpha=0.0, extra=()):
    """Element by element, in float64: RAM, or RAM+ with the overlap counts over ``base`` (+ ``extra``
    pairs of (base, models) for whole-model counts)."""
    def counts(b, ms):
        out = [[0, 0] for _ in ms]
        for j in range(b.numel()):
            changed = [abs(float(m.reshape(-1)[j]) - float(b.reshape(-1)[j])) > epsilon for m in ms]
            for i, c in enumerate(changed):
                if c:
                    out[i][0 if sum(changed) > 1 else 1] += 1
        return out

    lam = [1.0] * len(models)
    if scope is not None:
        cs = counts(base, models)
        for b2, ms2 in extra:
            cs = [[a + c for a, c in zip(x, y)] for x, y in zip(cs, counts(b2, ms2))]
        lam = [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in cs]
    out = base.double().clone().reshape(-1)
    for j in range(out.numel()):
        taus = [float(m.reshape(-1)[j]) - float(base.reshape(-1)[j]) for m in models]
        ch = [t for t in taus if abs(t) > epsilon]
        if len(ch) == 1:
            i = next(i for i, t in enumerate(taus) if abs(t) > epsilon)
            out[j] += taus[i] * lam[i]
        elif ch:
            out[j] += sum(ch) / len(ch)
    return out.reshape(base.shape)


def _sparse_zoo(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (6, 5), "b": (7,), "c": (3, 4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = []
    for _ in range(n):  # sparse RL-like task vectors: ~30 % of the entries changed, a few below epsilon
        m = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
            delta += 1e-4 * torch.randn(v.shape, generator=g)  # noise under epsilon
            m[k] = v + delta
        models.append(m)
    return base, models


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "ramplus"])
def test_matches_element_reference(method):
    base, models = _sparse_zoo()
    eps = 1e-3
    kw = {} if method == "ram" else {"r": 0.7, "alpha": 0.9}
    out = merge_state_dicts(method, models, base=base, epsilon=eps, **kw)
    for k in base:
        if method == "ram":
            ref = reference(base[k], [m[k] for m in models], eps)
        elif method == "ramplus_tl":
            ref = reference(base[k], [m[k] for m in models], eps, "tensor", 0.7, 0.9)
        else:
            others = [(base[o], [m[o] for m in models]) for o in base if o != k]
            ref = reference(base[k], [m[k] for m in models], eps, "model", 0.7, 0.9, others)
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-6, msg=k)


def test_whole_model_and_per_tensor_counts_differ_and_agree_on_one_tensor():
    base, models = _sparse_zoo()
    kw = dict(epsilon=1e-3, r=0.7, alpha=0.9)
    tl = merge_state_dicts("ramplus_tl", models, base=base, **kw)
    gl = merge_state_dicts("ramplus", models, base=base, **kw)
    assert any(not torch.allclose(tl[k], gl[k]) for k in base)
    one = ({"a": base["a"]}, [{"a": m["a"]} for m in models])
    torch.testing.assert_close(merge_state_dicts("ramplus_tl", one[1], base=one[0], **kw)["a"],
                               merge_state_dicts("ramplus", one[1], base=one[0], **kw)["a"])


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "ramplus"])
def test_one_model_is_that_model_and_small_changes_are_reset(method):
    base, models = _sparse_zoo(n=1)
    out = merge_state_dicts(method, models, base=base, epsilon=0.0)  # every change counts: the model itself
    for k in base:  # tau computed and added back: equal to float rounding
        torch.testing.assert_close(out[k], models[0][k], rtol=0, atol=1e-6)
    out = merge_state_dicts(method, models, base=base, epsilon=1e-3)  # the 1e-4 noise is dropped
    for k in base:
        changed = (models[0][k] - base[k]).abs() > 1e-3
        assert torch.equal(out[k][~changed], base[k][~changed])
        torch.testing.assert_close(out[k][changed], models[0][k][changed], rtol=0, atol=1e-6)


def test_dense_changes_give_the_average_of_the_task_vectors():
    base, models = _sparse_zoo()
    dense = [{k: v + 0.5 + 0.1 * i for k, v in base.items()} for i in range(3)]
    out = merge_state_dicts("ram", dense, base=base)
    for k in base:
        torch.testing.assert_close(out[k], base[k] + 0.6)


def test_errors():
    with pytest.raises(MergeError, match="epsilon must be >= 0"):
        merge_state_dicts("ram", [M1], base=BASE, epsilon=-1.0)
    with pytest.raises(MergeError, match="alpha must be >= 0"):
        merge_state_dicts("ramplus_tl", [M1], base=BASE, alpha=-0.5)
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("ram", [M1, M2])


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "ramplus"])
def test_block_kernels_equal_the_torch_form(method, stored, monkeypatch):
    """Tensors of two blocks or more go to the counting and merging kernels on the stored bits (bf16 output
    written directly): the same bytes as the torch form, with unchanged, unique, shared, inf and NaN changes."""
    import numpy as np

    import mergesmith.methods._fused as F
    from conftest import on_torch_path, spy_kernels

    calls = spy_kernels(monkeypatch, "ram", "ram_counts")
    real, dtypes = F.ram, set()
    monkeypatch.setattr(F, "ram", lambda ts, *a: dtypes.add(ts[0].dtype) or real(ts, *a))
    g = torch.Generator().manual_seed(5)
    base = torch.randn(600, 512, generator=g) * 0.02
    models = []
    for i in range(3):
        keep = torch.rand(600, 512, generator=g) < 0.4
        models.append(base + torch.randn(600, 512, generator=g) * 0.01 * keep)
    models[0][0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0])
    models[1][0, :2] = torch.tensor([float("-inf"), 5.0])
    base, models = {"w": base.to(stored)}, [{"w": m.to(stored)} for m in models]
    kw = {"epsilon": 0.004} | ({} if method == "ram" else {"r": 0.4, "alpha": 0.8})
    got = merge_state_dicts(method, models, base=base, **kw)["w"]
    want = on_torch_path(monkeypatch, lambda: merge_state_dicts(method, models, base=base, **kw)["w"])
    assert got.dtype == want.dtype == stored
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit())
    assert "ram" in calls and (method == "ram" or "ram_counts" in calls)
    assert dtypes == {np.dtype(np.int16 if stored == torch.bfloat16 else np.float32)}  # bf16: the bits as stored


@pytest.mark.parametrize("method", ["ramplus_tl", "ramplus"])
def test_a_model_that_changed_nothing_or_only_shared_entries(method):
    """unique_i = 0: lambda_i is finite (0 / 0 never happens) and scales nothing; epsilon 0 included."""
    base = {"w": torch.zeros(2, 3)}
    same = {"w": torch.zeros(2, 3)}  # no change at all
    m1 = {"w": torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])}
    m2 = {"w": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}  # its one change is shared with m1
    out = merge_state_dicts(method, [m1, m2, same], base=base, epsilon=0.0, r=0.5, alpha=1.0)["w"]
    # m1: 1 shared, 2 unique -> lambda 1.25
    assert torch.equal(out, torch.tensor([[2.0, 2.5, 0.0], [0.0, 0.0, 5.0]]))
