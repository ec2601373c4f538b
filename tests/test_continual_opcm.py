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
