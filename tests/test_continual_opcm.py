"""OPCM math: golden tests against the official loop written out in full, the projection's defining
properties, one model, zero layers, order dependence, and the one-shot ``opcm`` merge method."""
from __future__ import annotations

import pytest
import torch

from _continual_util import LINEAR, ref_opcm, tiny_sd
from mergesmith import merge_state_dicts
from mergesmith.api import merge_tensors
from mergesmith.continual import ContinualMerger
from mergesmith.continual import opcm as O


def _ref_project(delta, tau, alpha, full_diagonal):
    """P = U^T tau V with full (square) bases, zero its diagonal and top-left rho block, map back."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=True)
    v = vh.T
    split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    P = u.T @ tau.double() @ v
    if full_diagonal:
        P.diagonal().fill_(0)
    P[:split, :split] = 0
    return u @ P @ v.T


def test_split_rank_golden():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumsum / sum = .4 .7 .9 1
    assert O.split_rank(s, 0.5) == 1
    assert O.split_rank(s, 0.3) == 0
    assert O.split_rank(s, 0.7) == 2  # strictly greater than alpha
    assert O.split_rank(s, 0.95) == 3
    assert O.split_rank(s, 1.0) == 4  # nothing exceeds alpha: protect everything (documented)
    assert O.split_rank(torch.zeros(3), 0.5) == 0


@pytest.mark.parametrize("shape", [(6, 4), (4, 7), (5, 5)])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("full_diagonal", [True, False])
def test_projection_matches_full_basis_reference(shape, alpha, full_diagonal):
    g = torch.Generator().manual_seed(hash((shape, alpha)) % 1000)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    got = O.project(delta, tau, alpha, full_diagonal)
    want = _ref_project(delta, tau, alpha, full_diagonal)
    assert torch.allclose(got, want, atol=1e-10)
    # float32 path, as used on real checkpoints
    got32 = O.project(delta.float(), tau.float(), alpha, full_diagonal)
    assert torch.allclose(got32.double(), want, atol=2e-5)


def test_projection_removes_protected_block_and_diagonal():
    g = torch.Generator().manual_seed(1)
    delta, tau = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rho = O.split_rank(s, 0.5)
    assert 0 < rho < 5
    P = u.T @ O.project(delta, tau, 0.5) @ vh.T
    assert torch.allclose(P[:rho, :rho], torch.zeros(rho, rho, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(P.diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # everything else is kept
    P0 = u.T @ tau @ vh.T
    off = ~torch.eye(5, dtype=torch.bool)
    off[:rho, :rho] = False
    assert torch.allclose(P[off], P0[off], atol=1e-12)
    # paper-release behaviour keeps the diagonal beyond the block
    Pr = u.T @ O.project(delta, tau, 0.5, zero_full_diagonal=False) @ vh.T
    assert torch.allclose(Pr.diagonal()[rho:], P0.diagonal()[rho:], atol=1e-12)
    assert not torch.allclose(Pr, P)


def test_zero_merged_update_is_not_projected():
    tau = torch.randn(4, 3)
    assert torch.equal(O.project(torch.zeros(4, 3), tau, 0.5), tau)
    assert torch.equal(O.step("l.weight", torch.zeros(4, 3), tau, 0.5), tau)


def test_embeddings_and_vectors_are_elementwise():
    assert O.is_projected("model.layers.0.self_attn.q_proj.weight", (8, 8))
    assert O.is_projected("lm_head.weight", (64, 8))
    assert O.is_projected("transformer.h.0.attn.c_attn.weight", (8, 24))
    for name in ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight", "shared.weight",
                 "bert.embeddings.word_embeddings.weight"):
        assert not O.is_projected(name, (64, 8)), name
    assert not O.is_projected("model.norm.weight", (8,))
    assert not O.is_projected("scale", ())


@pytest.mark.parametrize("alpha,full_diagonal", [(0.5, True), (0.3, False), (0.8, True)])
def test_continual_matches_official_loop(tmp_path, alpha, full_diagonal):
    base = tiny_sd(0)
    models = [tiny_sd(10 + i, base) for i in range(4)]
    want, lam = ref_opcm(base, models, alpha, full_diagonal)
    cm = ContinualMerger(tmp_path / "state")
    cm.init(base, method="opcm", alpha=alpha, zero_full_diagonal=full_diagonal)
    for m in models:
        entry = cm.add(m)
    got = cm.state_dict()
    for k in want:
        assert torch.allclose(got[k].double(), want[k], atol=2e-5), k
    assert torch.equal(got["position_ids"], base["position_ids"])
    assert entry["summary"]["lambda_t"] == pytest.approx(lam, rel=1e-5)


def test_method_matches_official_loop_whole_model():
    base = tiny_sd(0)
    models = [tiny_sd(20 + i, base) for i in range(3)]
    want, _ = ref_opcm(base, models, 0.5)
    got = merge_state_dicts("opcm", models, base=base, alpha=0.5)
    for k in want:
        assert torch.allclose(got[k].double(), want[k], atol=2e-5), k


def test_one_model_gives_that_model(tmp_path):
    base = tiny_sd(0)
    m = tiny_sd(5, base)
    w = "layers.0.up.weight"
    assert torch.equal(merge_tensors("opcm", [m[w]], base[w], name=w), m[w])
    cm = ContinualMerger(tmp_path / "s")
    cm.init(base)
    cm.add(m)
    got = cm.state_dict()
    for k in m:
        assert torch.allclose(got[k], m[k], atol=1e-6), k
    assert cm.status()["summary"]["lambda_t"] == pytest.approx(1.0)


def test_order_dependence_is_deterministic():
    base = tiny_sd(0)
    models = [tiny_sd(30 + i, base) for i in range(3)]
    a = merge_state_dicts("opcm", models, base=base)
    a2 = merge_state_dicts("opcm", models, base=base)
    b = merge_state_dicts("opcm", models[::-1], base=base)
    w = "layers.0.up.weight"
    assert all(torch.equal(a[k], a2[k]) for k in a)  # same order: bitwise identical
    assert not torch.allclose(a[w], b[w], atol=1e-4)  # another order: another model (documented)
    ref_b, _ = ref_opcm(base, models[::-1], 0.5)
    assert torch.allclose(b[w].double(), ref_b[w], atol=2e-5)
    # element-wise tensors only see the sum of task vectors: the same direction in any order
    da, db = a["layers.0.q.bias"] - base["layers.0.q.bias"], b["layers.0.q.bias"] - base["layers.0.q.bias"]
    assert torch.allclose(da / da.norm(), db / db.norm(), atol=1e-4)


def test_shuffle_order_follows_the_seed():
    base = tiny_sd(0)
    models = [tiny_sd(40 + i, base) for i in range(4)]
    perm = O.permutation(4, 7)
    assert sorted(perm) == [0, 1, 2, 3] and perm == O.permutation(4, 7)
    seeds = {tuple(O.permutation(4, s)) for s in range(6)}
    assert len(seeds) > 1
    got = merge_state_dicts("opcm", models, base=base, seed=7, shuffle_order=True)
    want = merge_state_dicts("opcm", [models[i] for i in perm], base=base, seed=0)
    assert all(torch.equal(got[k], want[k]) for k in got)
    again = merge_state_dicts("opcm", models, base=base, seed=7, shuffle_order=True)
    assert all(torch.equal(got[k], again[k]) for k in got)


def test_lambda_grows_and_rescaling_keeps_mean_norm(tmp_path):
    base = tiny_sd(0)
    cm = ContinualMerger(tmp_path / "s")
    cm.init(base)
    lams = []
    norms = []
    for i in range(5):
        m = tiny_sd(50 + i, base)
        norms.append(float(torch.sqrt(sum(((m[k] - base[k]) ** 2).sum() for k in LINEAR + ("layers.0.q.bias", "embed_tokens.weight", "layers.1.norm.weight", "scale")))))
        lams.append(cm.add(m)["summary"]["lambda_t"])
    assert lams[0] == pytest.approx(1.0) and all(b > a for a, b in zip(lams, lams[1:]))
    got = cm.state_dict()
    tv = float(torch.sqrt(sum(((got[k] - base[k]) ** 2).sum() for k in got if got[k].is_floating_point())))
    assert tv == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_one_shot_runs_each_projected_chain_once(monkeypatch):
    """The statistics pass keeps D per matrix in a scratch folder; the apply pass only rescales it."""
    import mergesmith.methods.opcm as M

    base = tiny_sd(0)
    models = [tiny_sd(i + 1) for i in range(3)]
    calls = []
    real = M._chain
    monkeypatch.setattr(M, "_chain", lambda ctx, b, ms, p: (calls.append(ctx.name), real(ctx, b, ms, p))[1])
    got = merge_state_dicts("opcm", models, base=base, alpha=0.5)
    want, _ = ref_opcm(base, models, 0.5)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5)
    projected = [k for k, v in base.items() if O.is_projected(k, tuple(v.shape))]
    assert projected and all(calls.count(k) == 1 for k in projected)


# ---------------------------------------------------------------------------------------------------
# Gram route (tall/wide matrices) and coefficient route (row-chunked tall matrices of the one-shot method)


def _spectrum(m, n, s, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(96, 12), (12, 96), (60, 15)])
@pytest.mark.parametrize("alpha,full_diagonal", [(0.5, True), (0.3, False), (0.9, True)])
def test_gram_route_matches_thin_svd(shape, alpha, full_diagonal):
    g = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    assert O.uses_gram(shape)
    want = _ref_project(delta, tau, alpha, full_diagonal)
    got = O.project_gram(delta, tau, alpha, full_diagonal)
    assert got is not None and torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(O.project(delta, tau, alpha, full_diagonal), want, atol=1e-10)
    # float32 inputs: at least as close to the float64 reference as the float32 thin SVD
    got32 = O.project_gram(delta.float(), tau.float(), alpha, full_diagonal).double()
    svd32 = O.project_svd(delta.float(), tau.float(), alpha, full_diagonal).double()
    ref32 = _ref_project(delta.float().double(), tau.float().double(), alpha, full_diagonal)
    assert (got32 - ref32).abs().max() <= max(2 * (svd32 - ref32).abs().max(), 1e-6)
    # in place: the result is tau's own buffer
    t = tau.clone()
    assert O.project(delta, t, alpha, full_diagonal, inplace=True).data_ptr() == t.data_ptr()


def test_gram_route_decaying_spectrum_more_accurate_than_float32_svd():
    delta = _spectrum(200, 40, torch.logspace(0, -4, 40, dtype=torch.float64), 3).float()
    tau = torch.randn(200, 40, generator=torch.Generator().manual_seed(4))
    ref = O.project_svd(delta.double(), tau.double(), 0.5)
    gram = O.project_gram(delta, tau, 0.5)
    svd32 = O.project_svd(delta, tau, 0.5)
    assert gram is not None
    assert (gram.double() - ref).abs().max() < (svd32.double() - ref).abs().max()
    assert (gram.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_gram_route_falls_back_for_low_rank_deltas():
    # a rank-4 (LoRA-like) merged update: s_min / s_max ~ 1e-8 < GRAM_RCOND -> the exact thin SVD
    delta = _spectrum(96, 16, torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=torch.float64), 5).float()
    tau = torch.randn(96, 16, generator=torch.Generator().manual_seed(6))
    assert O.project_gram(delta, tau, 0.5) is None
    assert torch.equal(O.project(delta, tau, 0.5), O.project_svd(delta, tau, 0.5))
    # just above the guard the Gram route is taken
    ok = _spectrum(96, 16, torch.logspace(0, -5, 16, dtype=torch.float64), 7)
    assert O.project_gram(ok, tau.double(), 0.5) is not None


@pytest.mark.parametrize("n_models", [2, 3, 4])
@pytest.mark.parametrize("alpha,full_diagonal", [(0.5, True), (0.3, False)])
def test_coefficient_chain_equals_the_chain(n_models, alpha, full_diagonal):
    g = torch.Generator().manual_seed(10 + n_models)
    taus = [torch.randn(90, 12, generator=g, dtype=torch.float64) for _ in range(n_models)]
    want = O.chain("lm_head.weight", [t.clone() for t in taus], alpha, full_diagonal)
    grams: dict = {}
    for a in range(0, 90, 25):  # row chunks, as the engine streams them
        O.pairwise_grams([t[a:a + 25] for t in taus], grams)
    C, d_sq = O.coefficient_chain(grams, n_models, alpha, full_diagonal)
    got = torch.cat([O.combine([t[a:a + 25] for t in taus], C) for a in range(0, 90, 25)])
    assert torch.allclose(got, want, atol=1e-10)
    assert d_sq == pytest.approx(float(want.square().sum()), rel=1e-12)


def test_coefficient_chain_zero_update_and_low_rank():
    zero = torch.zeros(40, 8, dtype=torch.float64)
    tau = torch.randn(40, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    C, d_sq = O.coefficient_chain(O.pairwise_grams([zero, tau]), 2, 0.5)
    assert torch.allclose(O.combine([zero, tau], C), tau) and d_sq == pytest.approx(float(tau.square().sum()))
    # a rank-2 first task: only its 2 numerically non-zero directions are projected (documented)
    low = _spectrum(40, 8, torch.tensor([2.0, 1.0], dtype=torch.float64), 2)
    C, _ = O.coefficient_chain(O.pairwise_grams([low, tau]), 2, 0.5)
    got = O.combine([low, tau], C)
    u, s, vh = torch.linalg.svd(low, full_matrices=False)
    P = u[:, :2].T @ (got - low) @ vh[:2].T  # rho = 0 here (2/3 > alpha): only the diagonal is removed
    P0 = u[:, :2].T @ tau @ vh[:2].T
    assert torch.allclose(P.diagonal(), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(P[0, 1], P0[0, 1]) and torch.allclose(P[1, 0], P0[1, 0])
    # outside the rank-2 space nothing is removed
    rest = got - low - u[:, :2] @ P @ vh[:2]
    assert torch.allclose(rest, tau - u[:, :2] @ P0 @ vh[:2], atol=1e-10)


def _tall_sd(seed, base=None):
    g = torch.Generator().manual_seed(seed)
    shapes = {"lm_head.weight": (48, 6), "layers.0.q.weight": (6, 6), "layers.0.q.bias": (6,),
              "embed_tokens.weight": (48, 6)}
    if base is None:
        return {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def test_one_shot_chunks_tall_matrices_by_the_coefficient_route(tmp_path, monkeypatch):
    from _continual_util import save_sd
    from mergesmith.engine import DictSink, execute
    from mergesmith.methods import opcm as M
    from mergesmith.run import plan_recipe

    base = _tall_sd(0)
    models = [_tall_sd(i + 1, base) for i in range(3)]
    want, _ = ref_opcm(base, models, 0.5, linear=("lm_head.weight", "layers.0.q.weight"))
    whole = merge_state_dicts("opcm", models, base=base, alpha=0.5)  # lm_head whole (Gram route, aspect 8)
    monkeypatch.setattr(O, "CHUNK_MIN_ELEMENTS", 64)
    assert M.chunked((48, 6)) and not M.chunked((6, 6)) and not M.chunked((6, 48))
    calls = []
    real = O.coefficient_chain
    monkeypatch.setattr(O, "coefficient_chain", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    paths = [str(save_sd(sd, tmp_path / f"m{i}.safetensors")) for i, sd in enumerate([base] + models)]
    plan = plan_recipe({"merge_method": "opcm", "base_model": paths[0], "parameters": {"alpha": 0.5},
                        "models": [{"model": x} for x in paths[1:]]})
    sink = DictSink(plan)
    execute(plan, sink, chunk_elements=60)  # lm_head in row chunks of 10 rows
    assert calls == [1]  # the chain ran once, at the last chunk of lm_head
    for k in want:
        assert torch.allclose(sink.tensors[k].double(), want[k], atol=2e-5), k
        assert torch.allclose(sink.tensors[k], whole[k], atol=1e-5), k


def test_continual_uses_the_gram_route_for_tall_matrices(tmp_path, monkeypatch):
    base = _tall_sd(0)
    models = [_tall_sd(i + 1, base) for i in range(3)]
    want, lam = ref_opcm(base, models, 0.5, linear=("lm_head.weight", "layers.0.q.weight"))
    routes = []
    for fn in ("project_gram", "project_gram32"):
        real = getattr(O, fn)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            if out is not None:
                routes.append(tuple(a[0].shape))
            return out

        monkeypatch.setattr(O, fn, spy)
    cm = ContinualMerger(tmp_path / "state")
    cm.init(base, method="opcm", alpha=0.5)
    for m in models:
        entry = cm.add(m)
    got = cm.state_dict()
    assert routes.count((48, 6)) == 2  # one Gram-route step per added model after the first
    for k in want:
        assert torch.allclose(got[k].double(), want[k], atol=2e-5), k
    assert entry["summary"]["lambda_t"] == pytest.approx(lam, rel=1e-5)


def test_float32_gram_route_for_well_conditioned_updates(monkeypatch):
    # s_max / s_min <= GRAM32_KAPPA: the float32 Gram route, as accurate as the float32 thin SVD
    g = torch.Generator().manual_seed(8)
    for shape in [(90, 30), (30, 90), (40, 40)]:
        delta = _spectrum(*shape, torch.logspace(0, -0.6, min(shape), dtype=torch.float64), 9).float()
        tau = torch.randn(shape, generator=g)
        ref = _ref_project(delta.double(), tau.double(), 0.5, True)
        got = O.project_gram32(delta, tau, 0.5)
        svd32 = O.project_svd(delta, tau, 0.5)
        assert got is not None, shape
        assert (got.double() - ref).abs().max() <= max(6 * (svd32.double() - ref).abs().max(), 2e-6), shape
    # kappa 100 > GRAM32_KAPPA: rejected (by the Cholesky pre-check, before any eigh)
    ill = _spectrum(90, 30, torch.logspace(0, -2, 30, dtype=torch.float64), 10).float()
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a: (calls.append(1), real(*a))[1])
    assert O.project_gram32(ill, torch.randn(90, 30, generator=g), 0.5) is None and calls == []
    # project() then takes the float64 Gram route (aspect 3 < GRAM_ASPECT: the thin SVD)
    t = torch.randn(90, 30, generator=g)
    assert torch.equal(O.project(ill, t, 0.5), O.project_svd(ill, t, 0.5))
