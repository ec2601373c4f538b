"""Generalized task-arithmetic family: ties, dare_linear, dare_ties, della, della_linear, breadcrumbs,
breadcrumbs_ties. Goldens are hand computed or come from straightforward references written here."""
from __future__ import annotations

import pytest
import torch

from mergesmith.api import merge_tensors, method_params
from mergesmith.engine import run_statistics
from mergesmith.methods.base import MergeError, TensorContext, get_method

GTA = ["ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"]


# --------------------------------------------------------------------------------------------------
# helpers


def drive_stats(method, base_sd, model_sds, seed=0, **params):
    """The whole-model statistics passes over every tensor (the engine's loop, tensors held whole)."""
    spec = get_method(method)
    names = list(base_sd)
    ps = {k: method_params(method, len(model_sds), name=k, **params) for k in names}
    items = [(TensorContext(name=x, seed=seed), base_sd[x], [m[x] for m in model_sds], ps[x]) for x in names]
    return run_statistics(spec, ps[names[0]], items, len(model_sds))


def drive(method, base_sd, model_sds, seed=0, **params):
    """A minimal streaming driver following the engine contract: stats passes over every tensor
    (collect, then reduce), then the apply pass, one tensor at a time."""
    spec = get_method(method)
    state = drive_stats(method, base_sd, model_sds, seed=seed, **params)
    n = len(model_sds)
    return {x: spec.fn(TensorContext(name=x, seed=seed, stats=state), base_sd[x], [m[x] for m in model_sds],
                       method_params(method, n, name=x, **params))
            for x in base_sd}


def flat(sd, names):
    return torch.cat([sd[x].reshape(-1) for x in names])


def unflat(vec, like, names):
    out, o = {}, 0
    for x in names:
        k = like[x].numel()
        out[x] = vec[o:o + k].reshape(like[x].shape)
        o += k
    return out


def ref_ties_official(base_sd, model_sds, density, lam=1.0):
    """The official TIES algorithm on the concatenated task vectors (whole model)."""
    names = sorted(base_sd)
    b = flat(base_sd, names)
    T = torch.stack([flat(m, names) - b for m in model_sds])
    P = T.shape[1]
    thr = T.abs().kthvalue(P - int(P * density), dim=1, keepdim=True).values
    T = T * (T.abs() >= thr)
    s = torch.sign(T.sum(0))
    s[s == 0] = torch.sign(s.sum())
    sel = T * torch.where(s > 0, T > 0, T < 0)
    merged = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    return unflat(b + lam * merged, base_sd, names)


def ref_mergekit_gta(base, models, weights, sparsified, consensus, normalize, lam=1.0):
    """mergekit's GeneralizedTaskArithmetic on one tensor, given already sparsified deltas."""
    d = torch.stack(sparsified)
    w = torch.tensor(weights).reshape((-1,) + (1,) * base.dim())
    wd = d * w
    if consensus:
        maj = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(wd) == maj
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0)
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


def quantized_model(seed, shapes, negative_bias=0.0):
    """Base and task vectors on exact binary grids: task vectors have many exact ties and zeros."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-8, 8, s, generator=g).float() * 0.5 for k, s in shapes.items()}
    vals = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]) * 0.25
    probs = torch.tensor([1, 1, 1, 1, 1, 1, 1.0]) + torch.tensor([1, 1, 1, 0, 0, 0, 0.0]) * negative_bias
    models = []
    for _ in range(3):
        m = {}
        for k, s in shapes.items():
            idx = torch.multinomial(probs, max(1, int(torch.Size(s).numel())), replacement=True, generator=g)
            m[k] = base[k] + vals[idx].reshape(s)
        models.append(m)
    return base, models


# --------------------------------------------------------------------------------------------------
# TIES


def test_ties_hand_golden_official():
    base = torch.ones(5)
    t1 = torch.tensor([4.0, -3.0, 2.0, -1.0, 0.5])
    t2 = torch.tensor([-4.0, 1.0, 3.0, 0.5, 5.0])
    # density 0.4, n=5: threshold = (5 - 2)-th smallest |tau| -> 2 for t1, 3 for t2 (3 entries kept each)
    # trimmed: t1 [4,-3,2,0,0], t2 [-4,0,3,0,5]; sum [0,-3,5,0,5] -> gamma [0,-1,1,0,1], majority +1
    # dis-mean: [4, -3, 2.5, 0, 5]
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4)
    assert torch.equal(out, base + torch.tensor([4.0, -3.0, 2.5, 0.0, 5.0]))
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4, agg="sum", **{"lambda": 0.5})
    assert torch.allclose(out, base + 0.5 * torch.tensor([4.0, -3.0, 5.0, 0.0, 5.0]))
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4, agg="max")
    assert torch.equal(out, base + torch.tensor([4.0, -3.0, 3.0, 0.0, 5.0]))


def test_ties_hand_golden_mergekit_setting():
    base = torch.ones(5)
    t1 = torch.tensor([4.0, -3.0, 2.0, -1.0, 0.5])
    t2 = torch.tensor([-4.0, 1.0, 3.0, 0.5, 5.0])
    mk = dict(scope="tensor", exact_topk=True, weighted_elect=True, zero_sign="positive", normalize=True, int8_mask=True)
    # exact top-2: t1 [4,-3,0,0,0], t2 [-4,0,0,0,5]; sum [0,-3,0,0,5] -> sign 0 -> +1; weighted mean
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4, **mk)
    assert torch.equal(out, base + torch.tensor([4.0, -3.0, 0.0, 0.0, 5.0]))
    # weights before the election: w2 = 3 flips coordinate 0 to model 2's sign; weighted mean there = -4
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4, weight=[1.0, 3.0], **mk)
    assert torch.equal(out, base + torch.tensor([-4.0, -3.0, 0.0, 0.0, 5.0]))
    # paper mode: the weights do not vote; dis-mean divides the weighted sum by the count (4*1 / 1)
    out = merge_tensors("ties", [base + t1, base + t2], base, density=0.4, weight=[1.0, 3.0], scope="tensor", exact_topk=True)
    assert torch.equal(out, base + torch.tensor([4.0, -3.0, 0.0, 0.0, 15.0]))


def test_ties_mergekit_setting_matches_mergekit_reference():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 20, generator=g)
    models = [base + torch.randn(12, 20, generator=g) for _ in range(3)]
    w, d = [0.7, 1.3, 0.4], [0.3, 0.5, 0.2]
    out = merge_tensors("ties", models, base, density=d, weight=w, scope="tensor", exact_topk=True,
                        weighted_elect=True, zero_sign="positive", normalize=True)
    sparse = []
    for m, di in zip(models, d):
        t = m - base
        k = int(di * t.numel())
        idx = torch.argsort(t.abs().reshape(-1), descending=True)[:k]
        mask = torch.zeros(t.numel())
        mask[idx] = 1
        sparse.append(t * mask.reshape(t.shape))
    ref = ref_mergekit_gta(base, models, w, sparse, consensus=True, normalize=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_ties_global_equals_tensor_scope_on_one_tensor():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 33, generator=g)
    models = [base + 0.1 * torch.randn(16, 33, generator=g) for _ in range(3)]
    for d in (0.05, 0.2, 0.7):
        a = merge_tensors("ties", models, base, density=d, scope="global")
        b = merge_tensors("ties", models, base, density=d, scope="tensor")
        assert torch.equal(a, b)
    # ties at the threshold and zero signs: still identical (same >= rule, same majority)
    qb, qm = quantized_model(1, {"w": (40, 25)})
    a = merge_tensors("ties", [m["w"] for m in qm], qb["w"], density=0.3, scope="global")
    b = merge_tensors("ties", [m["w"] for m in qm], qb["w"], density=0.3, scope="tensor")
    assert torch.equal(a, b)


def test_ties_global_multi_tensor_equals_concatenated_reference():
    shapes = {"a.weight": (30, 17), "b.bias": (17,), "c.scale": (), "d.weight": (8, 16)}
    base, models = quantized_model(7, shapes, negative_bias=1.5)
    # make the majority differ locally: tensor d votes only positive, the model as a whole negative
    for m in models:
        m["d.weight"] = base["d.weight"] + (m["d.weight"] - base["d.weight"]).abs()
    spec = get_method("ties")
    p = method_params("ties", 3, name="a.weight", density=0.35)
    assert spec.stats_for(p).passes(p) == 3  # sample, window, major
    state = drive_stats("ties", base, models, density=0.35)
    assert state["major"] == -1.0
    for d in (0.1, 0.35):
        got = drive("ties", base, models, density=d)
        ref = ref_ties_official(base, models, d)
        for k in shapes:
            assert torch.equal(got[k], ref[k]), k
    # the per-tensor computation is genuinely different on this model (ties, majority)
    tensor_scope = drive("ties", base, models, density=0.1, scope="tensor")
    assert any(not torch.equal(tensor_scope[k], ref_ties_official(base, models, 0.1)[k]) for k in shapes)


@pytest.mark.parametrize("spill", [False, True])
def test_ties_majority_sign_settled_after_the_last_tensor(tmp_path, monkeypatch, spill):
    """The engine skips the `major` pass: it merges with fill +1, records the exact-cancellation
    coordinates, and patches them in the written shards when the whole-model sign is negative."""
    import mergesmith.deferred as D
    from safetensors.torch import load_file, save_file

    from mergesmith.run import run_recipe

    if spill:  # every recorded chunk goes through the scratch folder
        monkeypatch.setattr(D, "SPILL_BYTES", 0)
    seen = {}
    real_patches = D.SignDeferral.patches

    def patches(self):
        seen["tally"], seen["n"] = self.tally, sum(len(e[2]) for e in real_patches(self))
        yield from real_patches(self)

    monkeypatch.setattr(D.SignDeferral, "patches", patches)
    shapes = {"a.weight": (30, 17), "b.bias": (17,), "d.weight": (8, 64)}
    base, models = quantized_model(21, shapes, negative_bias=1.0)
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name / "model.safetensors")
    spec = get_method("ties")
    p = method_params("ties", 3, name="a.weight", density=0.3)
    state = spec.stats_for(p).defer(spec.stats_for(p).init(p, 3))
    assert "major" not in state["steps"] and state["major"] == "deferred"
    run_recipe({"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": str(tmp_path / f"m{i}")} for i in range(3)], "parameters": {"density": 0.3}},
               tmp_path / "out", shard_size="2KB")
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(f))
    ref = ref_ties_official(base, models, 0.3)
    assert seen["tally"] < 0 and seen["n"] > 0  # the patch ran, on real cancellations
    for k in shapes:
        assert torch.equal(got[k], ref[k]), k
    # in memory (DictSink.patch) as well
    mem = merge_tensors("ties", [m["a.weight"] for m in models], base["a.weight"], density=0.3)
    assert torch.equal(mem, merge_tensors("ties", [m["a.weight"] for m in models], base["a.weight"],
                                          density=0.3, scope="tensor"))


def test_ties_global_threshold_is_exact_on_continuous_values():
    g = torch.Generator().manual_seed(11)
    shapes = {"x": (64, 128), "y": (128,), "z": (3, 5, 7)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) * 10 ** torch.empty(v.shape).uniform_(-6, 1, generator=g)
               for k, v in base.items()} for _ in range(2)]
    got = drive("ties", base, models, density=0.27, weight=[0.5, 2.0], agg="sum")
    # reference: thresholds from kthvalue over the concatenation, weights applied after the vote
    names = list(base)
    b = flat(base, names)
    T = torch.stack([flat(m, names) - b for m in models])
    P = T.shape[1]
    T = T * (T.abs() >= T.abs().kthvalue(P - int(P * 0.27), dim=1, keepdim=True).values)
    s = torch.sign(T.sum(0))
    s[s == 0] = torch.sign(s.sum())
    agree = torch.where(s > 0, T > 0, T < 0)
    ref = unflat(b + ((T * torch.tensor([[0.5], [2.0]])) * agree).sum(0), base, names)
    for k in names:
        assert torch.allclose(got[k], ref[k], atol=1e-6)


def _big_model(seed):
    """Tensors larger than the engine's sampling cut-off, with layer-dependent delta scales."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (700, 130), "b.weight": (257, 300), "c.bias": (300,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    scale = {"a.weight": 1e-3, "b.weight": 3e-3, "c.bias": 1e-2}
    models = [{k: (v + torch.randn(v.shape, generator=g) * scale[k]).to(torch.bfloat16).float() for k, v in base.items()}
              for _ in range(3)]
    return base, models


def test_ties_global_sampled_estimate_then_exact_window_through_the_engine():
    from mergesmith.api import merge_state_dicts
    from mergesmith.engine import sample_units

    base, models = _big_model(5)
    for d in (0.03, 0.2, 0.8):
        got = merge_state_dicts("ties", models, base=base, density=d, scope="global")
        ref = ref_ties_official(base, models, d)
        for k in base:
            assert torch.equal(got[k], ref[k]), (d, k)
    # the sampled pass really reads a subset of rows
    job = type("Job", (), {"shape": (700, 130)})()
    units = sample_units(job, 16)
    assert len(units) == 1 and units[0].rows is None  # one unit: its runs of rows read as one tensor
    runs = units[0].runs
    rows = sum(b - a for a, b in runs)
    assert 700 // 32 <= rows <= 700 // 8 and len(runs) > 4
    assert all(b0 < a1 for (_, b0), (a1, _) in zip(runs, runs[1:]))  # spread over the tensor, no overlap


def test_ties_global_falls_back_to_exact_passes_when_the_sample_misses(monkeypatch):
    from mergesmith.methods import _gta_stats

    base, models = _big_model(6)
    monkeypatch.setattr(_gta_stats, "_window", lambda hist, n, d: (0, 1 << 16))  # a window of tiny values only
    state = drive_stats("ties", base, models, density=0.2)
    assert state["steps"] == ["sample", "window", "high", "low", "major"]
    got = drive("ties", base, models, density=0.2)
    ref = ref_ties_official(base, models, 0.2)
    for k in base:
        assert torch.equal(got[k], ref[k]), k


def test_ties_global_needs_constant_density():
    base, models = quantized_model(2, {"a": (10, 10), "b": (10,)})
    with pytest.raises(MergeError, match="one 'density' per model"):
        drive("ties", base, models, density=[{"filter": "b", "value": 0.5}, {"value": 0.2}])
    out = drive("ties", base, models, density=[{"filter": "b", "value": 0.5}, {"value": 0.2}], scope="tensor")
    assert set(out) == {"a", "b"}


def test_ties_stats_partials_are_small():
    spec = get_method("ties")
    base = torch.randn(300, 400)
    models = [base + torch.randn(300, 400) * 1e-3 for _ in range(2)]
    p = method_params("ties", 2, name="w")
    gs = spec.stats_for(p)
    state = gs.init(p, 2)
    part = gs.collect(0, state, TensorContext(name="w"), base, models, p)
    for idx, cnt in part["hist"]:
        assert idx.numel() < 5000 and int(cnt.sum()) == base.numel()
    assert gs.passes(p) == 3  # high, low, majority
    p2 = method_params("ties", 2, name="w", zero_sign="positive")
    assert spec.stats_for(p2).passes(p2) == 2
    assert spec.stats_for(method_params("ties", 2, name="w", scope="tensor")) is None


# --------------------------------------------------------------------------------------------------
# DARE


def test_dare_linear_golden_mask_values():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 40, generator=g)
    tau = torch.randn(50, 40, generator=g)
    out = merge_tensors("dare_linear", [base + tau], base, density=0.25)
    got = out - base
    kept = got != 0
    # every survivor is tau / 0.25 (inverse keep probability), every other entry is dropped
    assert torch.allclose(got[kept], tau[kept] * 4, rtol=1e-5, atol=1e-5)
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    l1 = merge_tensors("dare_linear", [base + tau], base, density=0.25, rescale="l1") - base
    assert torch.allclose(l1.abs().sum(), tau.abs().sum(), rtol=1e-4)
    none = merge_tensors("dare_linear", [base + tau], base, density=0.25, rescale="none") - base
    assert torch.allclose(none[kept], tau[kept], atol=1e-6)  # same mask (same seed and name)
    # mergekit's boolean: rescale: true = l1
    assert torch.equal(merge_tensors("dare_linear", [base + tau], base, density=0.25, rescale=True) - base, l1)


def test_dare_p0_is_identity_and_linear_is_task_arithmetic():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(7, 9, generator=g)
    models = [base + torch.randn(7, 9, generator=g) for _ in range(3)]
    ta = merge_tensors("task_arithmetic", models, base, weight=[0.5, 1.0, -0.3], **{"lambda": 0.7})
    out = merge_tensors("dare_linear", models, base, density=1.0, weight=[0.5, 1.0, -0.3], **{"lambda": 0.7})
    assert torch.allclose(out, ta, atol=1e-6)
    assert torch.equal(merge_tensors("dare_linear", models[:1], base, density=1.0), models[0])


def test_dare_expectation_is_tau():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(400, generator=g)
    tau = torch.randn(400, generator=g)
    acc = torch.zeros(400)
    n = 300
    for s in range(n):
        acc += merge_tensors("dare_linear", [base + tau], base, density=0.5, seed=s) - base
    mean = acc / n
    # per-entry std of the mean = |tau| / sqrt(n) = 0.058 |tau|
    assert ((mean - tau).abs().mean() / tau.abs().mean()).item() < 0.08
    assert torch.allclose(mean.sum(), tau.sum(), atol=0.05 * tau.abs().sum().item())


def test_dare_seed_reproducibility():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, 30, generator=g)
    models = [base + torch.randn(30, 30, generator=g) for _ in range(2)]
    a = merge_tensors("dare_linear", models, base, density=0.5, seed=1, name="layers.0.w")
    b = merge_tensors("dare_linear", models, base, density=0.5, seed=1, name="layers.0.w")
    c = merge_tensors("dare_linear", models, base, density=0.5, seed=1, name="layers.1.w")
    d = merge_tensors("dare_linear", models, base, density=0.5, seed=2, name="layers.0.w")
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c) and not torch.equal(a, d)
    # the two models get different masks
    one = merge_tensors("dare_linear", [models[0], models[0]], base, density=0.5, rescale="none", weight=[1.0, -1.0])
    assert not torch.equal(one, base)


def test_dare_ties_without_drop_is_ties_and_mergekit_setting():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(20, 21, generator=g)
    models = [base + torch.randn(20, 21, generator=g) for _ in range(3)]
    a = merge_tensors("dare_ties", models, base, density=1.0, ties_density=0.3)
    b = merge_tensors("ties", models, base, density=0.3)
    assert torch.equal(a, b)
    w = [1.0, 0.5, 2.0]
    mk = merge_tensors("dare_ties", models, base, density=1.0, weight=w, ties_density=1.0, rescale="l1",
                       weighted_elect=True, zero_sign="positive", normalize=False)
    ref = ref_mergekit_gta(base, models, w, [m - base for m in models], consensus=True, normalize=False)
    assert torch.allclose(mk, ref, atol=1e-6)
    # with drops: every kept entry of the merge comes from DARE'd vectors and the result is seeded
    x = merge_tensors("dare_ties", models, base, density=0.5, seed=3)
    y = merge_tensors("dare_ties", models, base, density=0.5, seed=3)
    assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# DELLA


def test_della_keep_rates_follow_ranks():
    g = torch.Generator().manual_seed(12)
    n, rows = 50, 400
    mags = torch.stack([torch.randperm(n, generator=g) + 1 for _ in range(rows)]).float()
    signs = torch.where(torch.rand(rows, n, generator=g) < 0.5, -1.0, 1.0)
    tau = mags * signs
    base = torch.zeros(rows, n)
    out = merge_tensors("della_linear", [tau], base, density=0.5, epsilon=0.2, rescale="none", **{"lambda": 1.0})
    kept = out != 0
    rank = mags.long() - 1  # 0 = smallest magnitude in its row
    q = 0.3 + 0.4 * rank.float() / (n - 1)
    for lo in range(0, n, 10):
        sel = (rank >= lo) & (rank < lo + 10)
        assert abs(kept[sel].float().mean().item() - q[sel].mean().item()) < 0.03, lo
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    # paper rescale: each survivor is divided by its own keep probability
    out = merge_tensors("della_linear", [tau], base, density=0.5, epsilon=0.2, **{"lambda": 1.0})
    k2 = out != 0
    assert torch.allclose(out[k2] * q[k2], tau[k2], rtol=1e-5)


def test_della_hand_golden_probs_and_elect():
    from mergesmith.methods.della import magprune_probs

    row = torch.tensor([[0.3, -5.0, 1.0, 0.3, 2.0]])
    # ranks ascending (stable): 0.3 (idx0) 0, 0.3 (idx3) 1, 1.0 2, 2.0 3, 5.0 4 -> rho = rank / 4
    q = magprune_probs(row, 0.6, 0.2)
    assert torch.allclose(q, 0.4 + 0.4 * torch.tensor([[0.0, 4.0, 2.0, 1.0, 3.0]]) / 4)
    assert torch.allclose(magprune_probs(torch.tensor(2.0), 0.6, 0.2), torch.tensor(0.8))  # 0-D: rho = 1
    # della with density 1: plain mergekit-style TIES without trim (weighted vote, weighted mean)
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([-3.0, 1.0, 1.0, 2.0])
    out = merge_tensors("della", [t1, t2], base, density=1.0, weight=[1.0, 2.0], **{"lambda": 1.0})
    # weighted: [1,-2,3,0] and [-6,2,2,4]; sums [-5,0,5,4] -> signs [-,+,+,+]
    # coord0: -6/2 = -3; coord1: 2/2 = 1; coord2: (3+2)/3; coord3: 4/2 = 2
    assert torch.allclose(out, torch.tensor([-3.0, 1.0, 5.0 / 3.0, 2.0]))


def test_della_window_validation():
    base = torch.zeros(3, 4)
    m = [torch.ones(3, 4)]
    with pytest.raises(MergeError, match="density - epsilon"):
        merge_tensors("della", m, base, density=0.1, epsilon=0.15)
    with pytest.raises(MergeError, match="density \\+ epsilon"):
        merge_tensors("della", m, base, density=0.9, epsilon=0.2)
    merge_tensors("della", m, base, density=0.8, epsilon=0.2)  # d + eps = 1 is allowed
    merge_tensors("della", m, base, density=1.0, epsilon=0.2)  # density 1: no pruning


def test_della_seed_reproducibility():
    g = torch.Generator().manual_seed(13)
    base = torch.randn(10, 12, generator=g)
    models = [base + torch.randn(10, 12, generator=g) for _ in range(2)]
    a = merge_tensors("della", models, base, seed=4, name="x")
    b = merge_tensors("della", models, base, seed=4, name="x")
    c = merge_tensors("della", models, base, seed=4, name="y")
    assert a.numpy().tobytes() == b.numpy().tobytes() and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# Breadcrumbs


def test_breadcrumbs_row_golden():
    base = torch.zeros(2, 10)
    tau = torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10],
                        [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]])
    # per row: drop the top 2 (gamma 0.2), keep the next 3 (beta 0.3)
    out = merge_tensors("breadcrumbs", [tau], base, density=0.3, gamma=0.2, **{"lambda": 1.0})
    exp = torch.zeros(2, 10)
    exp[0, 5:8] = tau[0, 5:8]
    exp[1, 5:8] = tau[1, 5:8]
    assert torch.equal(out, exp)
    # tensor scope (mergekit): ranks over all 20 entries -> drop top 4 (10..7), keep the next 6 (6..1)
    out = merge_tensors("breadcrumbs", [tau], base, density=0.3, gamma=0.2, scope="tensor", **{"lambda": 1.0})
    exp = torch.zeros(2, 10)
    exp[0, :6] = tau[0, :6]
    assert torch.equal(out, exp)
    # gamma + beta > 1: the official row rule keeps fewer; mergekit trims fewer outliers
    r = merge_tensors("breadcrumbs", [tau[:1]], base[:1], density=0.5, gamma=0.7, **{"lambda": 1.0})
    assert torch.equal(r, torch.cat([tau[:1, :3], torch.zeros(1, 7)], 1))
    t = merge_tensors("breadcrumbs", [tau[:1]], base[:1], density=0.5, gamma=0.7, scope="tensor", **{"lambda": 1.0})
    assert torch.equal(t, torch.cat([tau[:1, :5], torch.zeros(1, 5)], 1))
    # 0-D tensors are passed through in row scope (official)
    z = merge_tensors("breadcrumbs", [torch.tensor(3.0)], torch.tensor(1.0), **{"lambda": 1.0})
    assert z.item() == 3.0


def test_breadcrumbs_row_band_breaks_ties_by_position():
    """Row scope ranks equal magnitudes by position (ascending |tau|, then index): hand-computed."""
    base = torch.zeros(1, 10)
    tau = torch.tensor([[2.0, -1, 2, 3, -2, 1, 3, -2, 0.5, 1]])
    # ascending stable order of |tau|: 0.5(8) 1(1) 1(5) 1(9) 2(0) 2(2) 2(4) 2(7) 3(3) 3(6)
    # gamma 0.2 -> top 2 removed (ranks 8, 9: indices 3, 6); beta 0.3 -> ranks 5..7 kept: indices 2, 4, 7
    out = merge_tensors("breadcrumbs", [tau], base, density=0.3, gamma=0.2, **{"lambda": 1.0})
    exp = torch.zeros(1, 10)
    exp[0, [2, 4, 7]] = tau[0, [2, 4, 7]]
    assert torch.equal(out, exp)


def _band_reference(t: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Straightforward row-scope Breadcrumbs: per row, a Python sort by (|x|, index)."""
    out = torch.zeros_like(t)
    for r in range(t.shape[0]):
        row = t[r].tolist()
        n = len(row)
        n_top = int(gamma * n)
        n_keep = min(int(beta * n), n - n_top)
        order = sorted(range(n), key=lambda j: (abs(row[j]), j))
        for j in order[n - n_top - n_keep: n - n_top]:
            out[r, j] = t[r, j]
    return out


@pytest.mark.parametrize("kernels", ["fused", "numpy", "torch"])
def test_breadcrumbs_band_forms_agree_on_tied_data(kernels, monkeypatch):
    """The block kernel (numba), its numpy fallback and the torch path keep the same entries (bf16-born
    task vectors: many equal magnitudes), equal to a plain Python reference; -0.0 where torch gives it."""
    import mergesmith.methods._fused as F
    from mergesmith.methods.breadcrumbs import band_mask, band_rows_

    if kernels == "fused" and not F.enabled():
        pytest.skip("numba not installed")
    if kernels == "numpy":
        monkeypatch.setenv("MERGESMITH_FUSED", "0")
    g = torch.Generator().manual_seed(3)
    for n, beta, gamma in [(64, 0.3, 0.05), (257, 0.5, 0.1), (2048, 0.15, 0.006), (5, 0.6, 0.2)]:
        b = (torch.randn(40, n, generator=g) * 0.02).to(torch.bfloat16)
        m = (b.float() + torch.randn(40, n, generator=g) * 0.002).to(torch.bfloat16)
        t = m.float() - b.float()
        n_top = int(gamma * n)
        n_keep = min(int(beta * n), n - n_top)
        want = t * band_mask(t, n - n_top - n_keep, n_keep)
        if kernels == "torch":
            got = want
        else:
            got = t.clone()
            band_rows_(got.numpy(), n - n_top - n_keep, n - n_top)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), n
        assert torch.equal(got, _band_reference(t, beta, gamma)), n


def test_breadcrumbs_tensor_scope_is_mergekits_sort_slice():
    """Tensor scope keeps mergekit's ``magnitude_outliers`` entries, ties included: the slice
    [n_bot, n_bot + floor(beta n)) of ``torch.sort(|tau|)`` with n_bot = max(0, n - floor(beta n) - floor(gamma n))."""
    g = torch.Generator().manual_seed(4)
    for shape, beta, gamma in [((30, 17), 0.3, 0.05), ((64,), 0.5, 0.2), ((12, 40), 0.9, 0.3)]:
        tau = torch.randint(-3, 4, shape, generator=g).float() * 0.25
        n = tau.numel()
        target, n_top = int(beta * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        mask = torch.zeros(n)
        mask[torch.sort(tau.abs().reshape(-1), descending=False).indices[n_bot:n_bot + target]] = 1
        want = tau * mask.reshape(shape)
        got = merge_tensors("breadcrumbs", [tau], torch.zeros(shape), density=beta, gamma=gamma, scope="tensor",
                            **{"lambda": 1.0})
        assert torch.equal(got, want), shape


def test_breadcrumbs_ties_and_task_arithmetic():
    base = torch.zeros(1, 10)
    t1 = torch.arange(1.0, 11.0).reshape(1, 10)
    t2 = -2 * t1
    # keep ranks 2..4 (values 8,7,6 in t1 and -16,-14,-12 in t2); weights 1,1 -> negative mass wins
    out = merge_tensors("breadcrumbs_ties", [t1, t2], base, density=0.3, gamma=0.2, **{"lambda": 1.0})
    exp = torch.zeros(1, 10)
    exp[0, 5:8] = t2[0, 5:8]
    assert torch.equal(out, exp)
    g = torch.Generator().manual_seed(14)
    b = torch.randn(6, 8, generator=g)
    ms = [b + torch.randn(6, 8, generator=g) for _ in range(3)]
    ta = merge_tensors("task_arithmetic", ms, b, weight=[1.0, 0.5, 2.0], **{"lambda": 0.2})
    bc = merge_tensors("breadcrumbs", ms, b, density=1.0, gamma=0.0, weight=[1.0, 0.5, 2.0])
    assert torch.allclose(bc, ta, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Whole family


@pytest.mark.parametrize("method", GTA)
def test_identity_one_model_density_one(method):
    g = torch.Generator().manual_seed(15)
    for shape in [(6, 7), (5,), ()]:
        base = torch.randn(shape, generator=g)
        m = base + torch.randn(shape, generator=g)
        kw = {"density": 1.0, "lambda": 1.0}
        if method.startswith("breadcrumbs"):
            kw["gamma"] = 0.0
        if method == "dare_ties":
            kw["ties_density"] = 1.0
        out = merge_tensors(method, [m], base, **kw)
        assert torch.allclose(out, m, atol=1e-6), (method, shape)


@pytest.mark.parametrize("method", GTA)
def test_example_params_any_shape(method):
    spec = get_method(method)
    g = torch.Generator().manual_seed(16)
    for shape in [(64, 32), (32,), (), (2, 3, 4)]:
        base = torch.randn(shape, generator=g).to(torch.bfloat16)
        ms = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(3)]
        out = merge_tensors(method, ms, base, **spec.example)
        assert out.shape == base.shape and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert spec.base == "required" and spec.mergekit and spec.paper


def test_density_one_weight_one_is_task_arithmetic():
    g = torch.Generator().manual_seed(17)
    base = torch.randn(9, 11, generator=g)
    ms = [base + torch.randn(9, 11, generator=g) for _ in range(3)]
    ta = merge_tensors("task_arithmetic", ms, base)
    assert torch.allclose(merge_tensors("dare_linear", ms, base, density=1.0), ta, atol=1e-6)
    assert torch.allclose(merge_tensors("della_linear", ms, base, density=1.0), ta, atol=1e-6)
    assert torch.allclose(merge_tensors("breadcrumbs", ms, base, density=1.0, gamma=0.0, **{"lambda": 1.0}), ta, atol=1e-6)


def test_bad_params_are_one_line_errors():
    b = torch.zeros(4)
    m = [torch.ones(4)]
    cases = [
        ("ties", {"density": 1.5}, "outside"),
        ("ties", {"density": -0.1}, "outside"),
        ("ties", {"scope": "layer"}, "not one of"),
        ("ties", {"agg": "median"}, "not one of"),
        ("ties", {"exact_topk": True}, "exact_topk needs scope: tensor"),
        ("dare_linear", {"rescale": "l3"}, "not one of"),
        ("dare_linear", {"density": "half"}, "not a valid float"),
        ("dare_ties", {"ties_density": 2}, "outside"),
        ("della", {"epsilon": -0.1}, "outside"),
        ("breadcrumbs", {"gamma": 1.2}, "outside"),
        ("breadcrumbs", {"scope": "global"}, "not one of"),
        ("breadcrumbs", {"densty": 0.3}, "Did you mean 'density'"),
    ]
    for method, kw, msg in cases:
        with pytest.raises(MergeError, match=msg) as e:
            merge_tensors(method, m, b, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(MergeError, match="needs a base"):
        merge_tensors("ties", m, None)


def test_engine_integration_matches_driver():
    api = pytest.importorskip("mergesmith.api")
    if not hasattr(api, "merge_state_dicts"):
        pytest.skip("merge_state_dicts not available")
    try:
        import mergesmith.engine  # noqa: F401
    except ImportError:
        pytest.skip("engine not available")
    shapes = {"a.weight": (30, 17), "b.bias": (17,), "d.weight": (8, 64)}
    base, models = quantized_model(21, shapes, negative_bias=1.0)
    for method, kw in [("ties", {"density": 0.2}), ("dare_ties", {"density": 0.6}), ("della", {})]:
        got = api.merge_state_dicts(method, models, base, seed=5, **kw)
        ref = drive(method, base, models, seed=5, **kw)
        for k in shapes:
            assert torch.equal(got[k], ref[k]), (method, k)


def test_radix_select_equals_kthvalue():
    from mergesmith.methods._radix import kth_smallest

    g = torch.Generator().manual_seed(22)
    cases = [
        torch.randn(10007, generator=g).abs(),
        (torch.randint(0, 4, (5000,), generator=g).float() * 0.25),  # many ties and zeros
        torch.randn(3000, generator=g).abs() * 1e-40,  # subnormals
        torch.cat([torch.randn(100, generator=g).abs(), torch.tensor([float("inf"), 0.0])]),
        torch.tensor([2.5]),
    ]
    for x in cases:
        for r in {1, x.numel() // 3 + 1, x.numel() - 1, x.numel()} - {0}:
            assert kth_smallest(x, r, nonneg=True) == torch.kthvalue(x, r).values.item()


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "scope": "tensor", "zero_sign": "positive", "weight": [0.5, 1.0, 2.0]}),
    ("ties", {"density": 0.4, "agg": "max", "elect": "count", "lambda": 0.7}),
    ("dare_ties", {"density": 0.6, "ties_density": 0.5}),
    ("dare_linear", {"density": 0.6, "normalize": True, "weight": [1.0, 0.5, 0.25]}),
    ("della", {"density": 0.6, "epsilon": 0.1}),
    ("della", {"weight": [1.0, 0.5, 2.0], "lambda": 0.9, "elect": "count"}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "weight": [1.0, 0.5, 2.0]}),
    ("breadcrumbs_ties", {}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.1, "weight": [1.0, 0.5, 2.0], "normalize": True}),
    ("consensus_ties", {}),
    ("ties", {"density": 0.5, "weighted_elect": True, "weight": [0.5, 1.0, 2.0], "agg": "weighted_mean"}),
    ("ties", {"density": 0.5, "elect": "count", "agg": "sum", "weight": [2.0, 0.5, 1.0]}),
    ("dare_ties", {"density": 0.7, "ties_density": 0.6, "lambda": 0.5, "zero_sign": "positive", "weight": [1.0, 3.0, 0.5]}),
    ("task_arithmetic", {"weight": [1.0, -0.5, 2.0], "lambda": 0.7, "normalize": True}),
    ("task_arithmetic", {"lambda": 1.0}),  # unit weights, no scale: the kernel's plain-sum loops
])
@pytest.mark.parametrize("data", ["quantized", "continuous"])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_block_by_block_path_equals_the_whole_tensor_path(tmp_path, monkeypatch, method, params, data, kernels, stored):
    """Trim/elect/merge block by block over the kernel threads (and the blocked window histogram of the
    global trim) give the bytes of the whole-tensor operations: deferred majority patches included
    (quantized values: exact cancellations), thresholds to the bit (continuous values: no ties). Both
    block forms: the fused numba kernels (reading bf16 bits as stored) and the torch ops."""
    import mergesmith.methods._fused as F
    import mergesmith.methods._gta as G
    import mergesmith.methods._sampling as S

    if kernels == "fused" and not F.enabled():
        pytest.skip("numba not installed")
    if kernels == "torch":
        monkeypatch.setenv("MERGESMITH_FUSED", "0")
    from safetensors.torch import load_file, save_file

    from mergesmith.run import run_recipe

    shapes = {"a.weight": (30, 17), "b.bias": (17,), "d.weight": (8, 64)}
    base, models = quantized_model(23, shapes, negative_bias=1.0)
    if data == "continuous":
        g = torch.Generator().manual_seed(24)
        models = [{k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()} for _ in range(3)]
    dt = getattr(torch, stored)
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file({k: v.to(dt).contiguous() for k, v in sd.items()}, tmp_path / name / "model.safetensors")
    spec = get_method(method)
    params = {**spec.example, **params}
    recipe = {"merge_method": method, "base_model": str(tmp_path / "base"), "dtype": stored, "seed": 5,
              "models": [{"model": str(tmp_path / f"m{i}")} for i in range(3)], "parameters": params}

    def run(out):
        run_recipe(recipe, tmp_path / out)
        got = {}
        for f in (tmp_path / out).glob("*.safetensors"):
            got.update(load_file(f))
        return got

    real, real_combine, real_direct = G.Pipeline._merge_blocks, F.combine, F.combine_bf16
    calls, fused = [], []
    monkeypatch.setattr(G.Pipeline, "_merge_blocks", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(F, "combine", lambda *a: fused.append("f32") or real_combine(*a))
    monkeypatch.setattr(F, "combine_bf16", lambda *a: fused.append("bf16") or real_direct(*a))
    monkeypatch.setattr(S, "BLOCK", 16)  # several blocks per tensor, on two kernel threads
    blocked = run("blocked")
    assert calls, "the block path did not run"
    fusable = params.get("agg") != "max"
    assert bool(fused) == (kernels == "fused" and fusable)
    if fused and stored == "bfloat16" and method in ("ties", "task_arithmetic", "dare_ties", "dare_linear") and \
            params.get("scope") != "tensor":
        assert "bf16" in fused  # no sparsifier: the kernel reads the stored bits
    monkeypatch.setattr(G.Pipeline, "blockable", lambda self, *a: False)
    monkeypatch.setattr(S, "BLOCK", 1 << 22)  # no block path anywhere (window pass, sparsifiers)
    whole = run("whole")
    for k in shapes:
        assert torch.equal(blocked[k], whole[k]), k
    if method == "ties" and params == {**spec.example, "density": 0.3} and data == "quantized":  # independent reference
        ref = ref_ties_official(base, models, 0.3)
        for k in shapes:
            assert torch.equal(blocked[k], ref[k]), k
