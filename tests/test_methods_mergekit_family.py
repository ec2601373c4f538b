"""Golden tests for model_stock, nearswap, arcee_fusion, sce, passthrough, and a shape smoke test of
every method of tests/test_methods_spherical.py and this file."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from mergesmith.api import merge_tensors
from mergesmith.methods import arcee_fusion as af
from mergesmith.methods.base import MergeError, TensorContext, get_method

from conftest import on_torch_path, spy_kernels
from methods_spherical_helpers import randn, run, run_streamed

MINE = ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion", "sce", "passthrough"]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- model_stock


def ref_model_stock(base, models, clamp=True, mode="cosine"):
    b = base.double().reshape(-1)
    ds = [m.double().reshape(-1) - b for m in models]
    vals = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            c = float(ds[i] @ ds[j]) / max(float(ds[i].norm() * ds[j].norm()), 1e-6)
            vals.append(math.acos(c) if mode == "angle" else c)
    cos = math.cos(sum(vals) / len(vals)) if mode == "angle" else sum(vals) / len(vals)
    n = len(models)
    t = n * cos / (1 + (n - 1) * cos)
    if clamp:
        t = min(1.0, max(0.0, t))
    avg = sum(m.double().reshape(-1) for m in models) / n
    return (t * avg + (1 - t) * b).reshape(base.shape)


def test_model_stock_parallel_offsets_give_plain_average():
    base, d = randn(4, 3, seed=1), randn(4, 3, seed=2)
    models = [base + d, base + 2 * d, base + 0.5 * d]  # cos = 1 -> t = 1
    close(run("model_stock", models, base), sum(models) / 3)


def test_model_stock_orthogonal_offsets_give_the_anchor():
    base = randn(4, seed=3)
    models = [base + torch.tensor([1.0, 0, 0, 0]), base + torch.tensor([0, 2.0, 0, 0])]
    close(run("model_stock", models, base), base)


def test_model_stock_two_models_known_angle():
    base = randn(2, seed=4)
    d1, d2 = torch.tensor([2.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # cos = 0.5 -> t = 2/3
    m1, m2 = base + d1, base + d2
    close(run("model_stock", [m1, m2], base), 2 / 3 * (m1 + m2) / 2 + 1 / 3 * base)


def test_model_stock_three_models_cosine_vs_angle():
    base = torch.zeros(3)
    e1, e2 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    models = [e1, e2, (e1 + e2) / math.sqrt(2)]  # pairwise angles pi/2, pi/4, pi/4
    avg = sum(models) / 3
    # angle mode: mean angle pi/3 -> cos 0.5 -> t = 1.5 / 2 = 0.75
    close(run("model_stock", models, base, cos_mode="angle"), 0.75 * avg)
    # cosine mode: mean cos = sqrt(2)/3
    c = math.sqrt(2) / 3
    close(run("model_stock", models, base), 3 * c / (1 + 2 * c) * avg)


def test_model_stock_matches_reference_random():
    base = randn(5, 6, seed=5)
    models = [base + 0.1 * randn(5, 6, seed=s) + 0.05 for s in (6, 7, 8)]
    for mode in ("cosine", "angle"):
        close(run("model_stock", models, base, cos_mode=mode), ref_model_stock(base, models, mode=mode))


def test_model_stock_clamp_and_mergekit_unclamped():
    base = torch.zeros(2)
    m1, m2 = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, math.sqrt(3) / 2])  # cos = -0.5 -> t = -2
    close(run("model_stock", [m1, m2], base), base)
    close(run("model_stock", [m1, m2], base, clamp=False), -2 * (m1 + m2) / 2 + 3 * base)
    close(run("model_stock", [m1, m2], base, clamp=False), ref_model_stock(base, [m1, m2], clamp=False))
    # cos = -1 with two models: the denominator vanishes -> the anchor
    close(run("model_stock", [m1, -m1], base, clamp=False), base)


def test_model_stock_filter_wise_and_frozen():
    base = torch.zeros(2, 2)
    m1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    m2 = torch.tensor([[2.0, 2.0], [0.0, 1.0]])  # row 0 parallel (t=1), row 1 orthogonal (t=0)
    out = run("model_stock", [m1, m2], base, filter_wise=True)
    close(out, torch.tensor([[1.5, 1.5], [0.0, 0.0]]))
    b = randn(3, seed=9)
    close(run("model_stock", [b.clone(), b.clone()], b), b)  # frozen tensor: zero offsets -> anchor


def test_model_stock_needs_two_models():
    a = randn(3, seed=10)
    with pytest.raises(MergeError, match="method 'model_stock' needs at least 2 model"):
        merge_tensors("model_stock", [a], a)
    with pytest.raises(MergeError, match="'cos_mode'.*not one of cosine, angle"):
        run("model_stock", [a, a], a, cos_mode="median")


# ---------------------------------------------------------------------------------------- nearswap


def test_nearswap_hand_case():
    base = torch.zeros(4)
    model = torch.tensor([0.0005, 0.001, 0.002, -0.004])
    # w = clamp(0.001 / |diff|) = [1, 1, 0.5, 0.25]
    close(run("nearswap", [model], base, t=0.001), torch.tensor([0.0005, 0.001, 0.001, -0.001]))


def test_nearswap_limits():
    base, model = randn(3, 4, seed=11), randn(3, 4, seed=12)
    torch.testing.assert_close(run("nearswap", [model], base, t=0.0), base)
    close(run("nearswap", [model], base, t=100.0), model)
    close(run("nearswap", [base.clone()], base, t=1e-4), base)
    with pytest.raises(MergeError, match="missing required parameter 't'"):
        run("nearswap", [model], base)
    with pytest.raises(MergeError, match="method 'nearswap' takes at most 1 model"):
        merge_tensors("nearswap", [model, model], base)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_nearswap_block_kernel_equals_the_torch_form(stored, monkeypatch):
    """Tensors of two blocks or more go to the fused kernel on the stored bits (bf16 output written
    directly): the same bytes as the torch form, with exact zeros, tiny and huge differences, inf and NaN."""
    from mergesmith import merge_state_dicts

    import mergesmith.methods._fused as F

    calls = spy_kernels(monkeypatch, "nearswap")
    real, dtypes = F.nearswap, set()
    monkeypatch.setattr(F, "nearswap", lambda m, *a: dtypes.add(m.dtype) or real(m, *a))
    g = torch.Generator().manual_seed(21)
    base = torch.randn(700, 512, generator=g) * 0.02
    model = base + torch.randn(700, 512, generator=g) * torch.logspace(-9, 0, 512)  # |diff| across scales
    model[0, :40] = base[0, :40]  # diff 0: w = t / 1e-6
    model[1, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    base[2, :2] = torch.tensor([float("nan"), float("inf")])
    base, model = {"w": base.to(stored)}, {"w": model.to(stored)}
    for t in (1e-3, 1e-7, 0.0, 3.0):
        got = merge_state_dicts("nearswap", [model], base=base, t=t)["w"]
        want = on_torch_path(monkeypatch, lambda: merge_state_dicts("nearswap", [model], base=base, t=t)["w"])
        assert got.dtype == want.dtype == stored
        assert torch.equal(got.isnan(), want.isnan()), t
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]) and torch.equal(got[ok].signbit(), want[ok].signbit()), t
    assert calls, "the kernel did not run"
    assert dtypes == {np.dtype(np.int16 if stored == torch.bfloat16 else np.float32)}  # bf16: the bits as stored


# ------------------------------------------------------------------------------------ arcee_fusion


def ref_arcee_fusion(base, model, idx=None):
    b, m = base.double(), model.double()
    rows_b, rows_m = b.reshape(-1, b.shape[-1]), m.reshape(-1, m.shape[-1])
    imp = torch.empty_like(rows_m)
    for r in range(rows_m.shape[0]):
        p = torch.softmax(rows_m[r], 0) + 1e-8
        q = torch.softmax(rows_b[r], 0) + 1e-8
        kl = float((p * (p / q).log()).sum())
        imp[r] = (rows_m[r] - rows_b[r]).abs() * kl
    flat = imp.reshape(-1) if idx is None else imp.reshape(-1)[idx]
    s = sorted(flat.tolist())
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    return (rows_b + (rows_m - rows_b) * keep).reshape(base.shape)


def test_arcee_fusion_keeps_only_the_outlier():
    base = torch.zeros(8)
    delta = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 5.0])
    # importance = c |delta| with c = KL > 0: q1 = .02c, median = .04c, q3 = .06c -> threshold .10c
    out = run("arcee_fusion", [base + delta], base)
    close(out, torch.tensor([0, 0, 0, 0, 0, 0, 0, 5.0]))


def test_arcee_fusion_shift_invariant_rows_are_dropped():
    base = randn(6, 5, seed=13)
    model = base + 0.1 * randn(6, 5, seed=14)
    model[0] = base[0] + 1.0  # the largest |delta|, but a constant shift leaves the softmax (and KL) unchanged
    model[2] = randn(5, seed=15) * 3
    out = run("arcee_fusion", [model], base)
    close(out[0], base[0])
    close(out, ref_arcee_fusion(base, model))


def test_arcee_fusion_matches_reference_random():
    base = randn(6, 7, seed=15)
    model = base + randn(6, 7, seed=16) * torch.linspace(0.01, 1.0, 7)
    close(run("arcee_fusion", [model], base), ref_arcee_fusion(base, model))
    torch.testing.assert_close(run("arcee_fusion", [base.clone()], base), base)


def test_arcee_fusion_large_tensor_sample_is_seeded(monkeypatch):
    monkeypatch.setattr(af, "SAMPLE_SIZE", 50)
    base = randn(20, 30, seed=17)
    model = base + randn(20, 30, seed=18) * torch.linspace(0.0, 1.0, 30)
    name = "model.layers.3.self_attn.o_proj.weight"
    out = run("arcee_fusion", [model], base, name=name, seed=7)
    torch.testing.assert_close(out, run("arcee_fusion", [model], base, name=name, seed=7))
    g = TensorContext(name=name, seed=7).generator(0)
    idx = torch.randint(600, (50,), generator=g)
    close(out, ref_arcee_fusion(base, model, idx))
    outs = {tuple(run("arcee_fusion", [model], base, name=name, seed=s).reshape(-1).tolist()) for s in range(6)}
    assert len(outs) > 1  # the sample, hence the threshold, depends on the seed


@pytest.mark.parametrize("sample", [50, None])
def test_arcee_fusion_streamed_in_row_chunks_equals_whole(monkeypatch, sample):
    """The sums phase gathers the same sample (or every score) chunk by chunk: the same threshold."""
    if sample is not None:
        monkeypatch.setattr(af, "SAMPLE_SIZE", sample)
    base = randn(20, 30, seed=17)
    model = base + randn(20, 30, seed=18) * torch.linspace(0.0, 1.0, 30)
    name = "model.layers.3.self_attn.o_proj.weight"
    whole = run("arcee_fusion", [model], base, name=name, seed=7)
    for rows in (1, 3, 7):
        torch.testing.assert_close(run_streamed("arcee_fusion", [model], base, rows=rows, name=name, seed=7), whole,
                                   rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- sce


def test_sce_hand_case():
    base = torch.zeros(4)
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, -1.0, 0.0])
    # eta = [3.5, 1.5] / 5; elected signs of [3, -1, 2, 0] = [+, -, +, +]
    close(run("sce", [t1, t2], base), torch.tensor([1.3, -2.0, 3.0, 0.0]))
    close(run("sce", [t1, t2], base, normalize=False), torch.tensor([1.3, -1.4, 2.1, 0.0]))


def ref_sce(base, models, topk):
    b = base.double()
    d = torch.stack([m.double() - b for m in models])
    if topk < 1:
        var = d.var(dim=0, unbiased=False).reshape(-1)
        nz = [i for i in range(var.numel()) if var[i] != 0]
        k = int(topk * len(nz))
        order = sorted(range(var.numel()), key=lambda i: -float(var[i]))[:k]
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[order] = True
        d = d * keep.reshape(base.shape)
    e = [float((x ** 2).mean()) for x in d]
    eta = [x / sum(e) for x in e]
    s = d.sum(0)
    elected = torch.where(s >= 0, 1.0, -1.0)
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for i in range(len(models)):
        agree = (torch.sign(d[i]) == elected).double()
        num += eta[i] * agree * d[i]
        den += eta[i] * agree
    den[den == 0] = 1
    return b + num / den


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.2])
def test_sce_matches_reference(topk):
    base = randn(5, 8, seed=19)
    models = [base + randn(5, 8, seed=s) * sc for s, sc in ((20, 0.1), (21, 0.3), (22, 0.2))]
    close(run("sce", models, base, select_topk=topk), ref_sce(base, models, topk))


@pytest.mark.parametrize("block", [None, 7])
@pytest.mark.parametrize("topk", [0.3, 0.5, 0.77])
def test_sce_ties_at_the_threshold_keep_the_lowest_indices(monkeypatch, topk, block):
    """Integer task vectors of two models: exact variances with many ties at the k-th largest. The
    lowest flat indices among the ties are kept, in memory and streamed in row chunks alike (and
    with the flat blocks SCE works in crossing rows)."""
    from mergesmith.methods import sce as sce_module

    if block is not None:
        monkeypatch.setattr(sce_module, "BLOCK", block)
    g = torch.Generator().manual_seed(5)
    base = (randn(12, 10, seed=30) * 4).round() / 4  # so that (base + integer) - base is exact
    models = [base + torch.randint(-2, 3, (12, 10), generator=g).float() for _ in range(2)]
    var = torch.stack([m - base for m in models]).double().var(dim=0, unbiased=False).reshape(-1)
    k = int(topk * int(torch.count_nonzero(var)))
    thr = var.sort(descending=True).values[k - 1]
    assert int((var > thr).sum()) < k < int((var >= thr).sum())  # the ties at the threshold are split
    whole = run("sce", models, base, select_topk=topk)
    close(whole, ref_sce(base, models, topk))
    for rows in (1, 5):
        close(run_streamed("sce", models, base, rows=rows, select_topk=topk), whole, tol=1e-6)


@pytest.mark.parametrize("topk,normalize", [(1.0, True), (0.4, True), (0.4, False)])
def test_sce_streamed_in_row_chunks_matches_reference(topk, normalize):
    base = randn(9, 8, seed=19)
    models = [base + randn(9, 8, seed=s) * sc for s, sc in ((20, 0.1), (21, 0.3), (22, 0.2))]
    whole = run("sce", models, base, select_topk=topk, normalize=normalize)
    for rows in (1, 2, 4):
        close(run_streamed("sce", models, base, rows=rows, select_topk=topk, normalize=normalize), whole, tol=1e-6)
    if normalize:
        close(whole, ref_sce(base, models, topk))


def test_sce_variance_is_torch_var():
    """kernels.variance reproduces mergekit's torch.var(stack, dim=0, unbiased=False) bit for bit."""
    from mergesmith.methods.kernels import variance

    base = (randn(300, 70, seed=40) * 0.02).bfloat16().float()
    for n in (1, 2, 3, 5):
        models = [(base + randn(300, 70, seed=41 + i) * 0.002).bfloat16().float() for i in range(n)]
        ref = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False).reshape(-1)
        assert torch.equal(variance(models, base), ref)
        wide = [randn(300, 70, seed=50 + i) * 10.0 ** torch.randint(-6, 6, (300, 70)) for i in range(n)]
        assert torch.equal(variance(wide), torch.var(torch.stack(wide), dim=0, unbiased=False).reshape(-1))


def test_sce_select_keeps_top_variance_positions():
    base = torch.zeros(5)
    m1 = torch.tensor([1.0, 0.1, 3.0, 0.0, 0.3])
    m2 = torch.tensor([-1.0, 0.1, 0.0, 0.0, 0.2])
    # variances [1, 0, 2.25, 0, 0.0025]: 3 non-zero -> keep int(0.5 * 3) = 1 position (index 2), where
    # only model 1 moved, so eta = [1, 0] and the result there is 3
    close(run("sce", [m1, m2], base, select_topk=0.5), torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]))
    # keep 2 of 3: indices 2 and 0; at 0 the deltas +1/-1 tie (sum 0 -> +), model 1 wins
    e1, e2 = (1 + 9) / 5, 1 / 5
    close(run("sce", [m1, m2], base, select_topk=0.7), torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0]))
    assert e1 > e2


def test_sce_single_model_and_identity():
    base, m = randn(3, 3, seed=23), randn(3, 3, seed=24)
    close(run("sce", [m], base), m)
    torch.testing.assert_close(run("sce", [m], base, select_topk=0.5), base)  # no variance with one model
    torch.testing.assert_close(run("sce", [base.clone(), base.clone()], base), base)


# ------------------------------------------------------------------------------------- passthrough


def test_passthrough_copies_and_scales():
    m = randn(4, 2, seed=25)
    torch.testing.assert_close(run("passthrough", [m]), m)
    torch.testing.assert_close(run("passthrough", [m], scale=0.5), 0.5 * m)
    torch.testing.assert_close(merge_tensors("passthrough", [m], scale=[2.0]), 2 * m)
    with pytest.raises(MergeError, match="no base model"):
        run("passthrough", [m], m)
    with pytest.raises(MergeError, match="method 'passthrough' takes at most 1 model"):
        merge_tensors("passthrough", [m, m])


def test_passthrough_takes_inputs_as_stored_and_scales_in_float32():
    """Inputs come as stored: a copy keeps the bytes (and never aliases the caller's tensor); a scale is
    applied in float32 and cast once to the output dtype (float32 output keeps the float32 product)."""
    from mergesmith import merge_state_dicts

    g = torch.Generator().manual_seed(26)
    m = {"w": torch.randn(300, 7, generator=g).to(torch.bfloat16)}
    got = merge_state_dicts("passthrough", [m])["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, m["w"]) and got.data_ptr() != m["w"].data_ptr()
    got = merge_state_dicts("passthrough", [m], scale=0.3)["w"]
    assert torch.equal(got, (m["w"].float() * 0.3).to(torch.bfloat16))
    got = merge_state_dicts("passthrough", [m], scale=0.3, dtype="float32")["w"]
    assert got.dtype == torch.float32 and torch.equal(got, m["w"].float() * 0.3)


# ------------------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("method", MINE)
def test_every_shape_runs_with_example_params(method):
    spec = get_method(method)
    module = sys.modules[spec.fn.__module__]
    assert spec.paper and spec.math and module.__doc__ and spec.fn.__module__.endswith("." + method)
    n = spec.max_models if spec.max_models is not None else 3
    for shape in [(), (5,), (4, 6), (2, 3, 4), (64, 32)]:
        models = [randn(*shape, seed=100 + i).to(torch.bfloat16) for i in range(n)]
        base = randn(*shape, seed=99).to(torch.bfloat16) if spec.base != "none" else None
        out = run(method, models, base, **spec.example)
        assert out.shape == torch.Size(shape) and out.dtype == torch.bfloat16
        assert torch.isfinite(out.float()).all()
        again = run(method, models, base, **spec.example)
        torch.testing.assert_close(out, again, rtol=0, atol=0)
