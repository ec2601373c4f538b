"""Twin-Merging: exclusive-knowledge compression, router training and the routed module, on a toy
three-task regression problem (tiny MLP) and a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mergesmith.api import merge_state_dicts
from mergesmith.experts.twin import (
    TwinMergedModel, TwinRouter, build_twin_model, compress_exclusive, exclusive_numel, hidden_state_features,
    load_exclusives, save_exclusives, train_router,
)
from mergesmith.methods import _spectral as sp
from mergesmith.methods.base import MergeError

D, H, O, T = 8, 32, 4, 3


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and spin on a busy machine)
    yield
    torch.set_num_threads(old)


def _mlp():
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, O))


class _Tasks:
    """Three regression tasks y = A_t x; inputs of task t are centred at 5 e_t, so the task is visible
    in the input (what the router must learn)."""

    def __init__(self, seed=1):
        self.g = torch.Generator().manual_seed(seed)
        self.A = [torch.randn(O, D, generator=self.g) for _ in range(T)]

    def sample(self, t, n):
        x = 5.0 * torch.eye(D)[t] + torch.randn(n, D, generator=self.g)
        return x, x @ self.A[t].T


@pytest.fixture(scope="module")
def toy():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = _mlp()
    tasks = _Tasks()
    fts = []
    for t in range(T):
        m = _mlp()
        m.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        x, y = tasks.sample(t, 256)
        for _ in range(120):
            loss = ((m(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        fts.append(m.eval())
    tests = [tasks.sample(t, 200) for t in range(T)]
    train_x = torch.cat([tasks.sample(t, 150)[0] for t in range(T)])
    train_ids = torch.arange(T).repeat_interleave(150)
    torch.set_num_threads(old)
    return base, fts, tests, train_x, train_ids


def _losses(f, tests):
    with torch.no_grad():
        return [float(((f(x) - y) ** 2).mean()) for x, y in tests]


def test_twin_beats_plain_merge_on_toy_tasks(toy):
    base, fts, tests, xs, ids = toy
    plain = _mlp()
    plain.load_state_dict(merge_state_dicts("twin_merging", fts, base=base))
    twin = build_twin_model(_mlp(), base, fts, xs, ids, density=0.25, exclude="", epochs=30, batch_size=64, seed=0)
    assert twin.train_report["best_accuracy"] >= 0.95
    # routing accuracy on held-out inputs
    for t, (x, _) in enumerate(tests):
        w = twin.routing_weights(x)
        assert float((w.argmax(-1) == t).float().mean()) >= 0.95
    lp, lt = _losses(plain, tests), _losses(twin, tests)
    assert all(a < b for a, b in zip(lt, lp)), (lt, lp)
    assert sum(lt) < 0.8 * sum(lp), (lt, lp)
    twin.temperature = 0.1  # sharper routing: closer to each task's own expert
    assert sum(_losses(twin, tests)) < 0.5 * sum(lp)
    twin.temperature = 1.0
    # batch routing (one weight set per batch) also helps on single-task batches
    twin.routing = "batch"
    lb = _losses(twin, tests)
    assert all(a < b for a, b in zip(lb, lp)), (lb, lp)
    # compression: 25% of the rank of every matrix
    full = sum(p.numel() for p in base.parameters())
    assert exclusive_numel(compress_exclusive(plain.state_dict(), fts, 0.25, exclude="")) < 0.7 * T * full


def test_full_rank_one_hot_routing_recovers_each_finetuned_model(toy):
    base, fts, tests, xs, ids = toy
    shared = _mlp()
    shared.load_state_dict(merge_state_dicts("twin_merging", fts, base=base))
    ex = compress_exclusive(shared.state_dict(), fts, density=1.0, exclude="")

    class Oracle(nn.Module):  # routes by a task id stored in the last input column
        def forward(self, f):
            return 100.0 * nn.functional.one_hot(f[:, -1].long(), T).float()

    twin = TwinMergedModel(shared, ex, Oracle(), feature_fn=lambda m, x: x)
    for t in range(T):
        w = torch.zeros(T)
        w[t] = 1.0
        mp = twin.merged_parameters(w)
        ref = fts[t].state_dict()
        assert set(mp) == set(ref)
        for k in mp:
            assert torch.allclose(mp[k], ref[k], atol=1e-5), k

    from torch.func import functional_call

    x = torch.cat([tests[t][0][:4] for t in range(T)])
    tid = torch.arange(T).repeat_interleave(4)
    xin = x.clone()
    xin[:, -1] = tid.float()  # the oracle's routing column (the module sees the same input)
    twin.feature_fn = lambda m, v: v
    with torch.no_grad():
        out = twin(xin)
        ref = torch.cat([fts[int(t)](xin[i:i + 1]) for i, t in enumerate(tid)])
        assert torch.allclose(out, ref, atol=1e-5)
        # routing weights one-hot: merged params = fine-tuned params
        w = twin.routing_weights(xin)
        assert torch.allclose(w, nn.functional.one_hot(tid, T).float())
        assert torch.allclose(functional_call(shared, twin.merged_parameters(w[0]), (xin[:1],)), ref[:1], atol=1e-5)


def test_compress_exclusive_ranks_and_golden(toy):
    base, fts, *_ = toy
    shared = merge_state_dicts("twin_merging", fts, base=base)
    ex = compress_exclusive(shared, fts, density=0.1, exclude=r"^4\.")
    assert "4.weight" not in ex[0] and "4.bias" not in ex[0]  # excluded: no exclusive part
    lr = ex[1]["2.weight"]
    assert isinstance(lr, sp.LowRank) and lr.rank == 3  # floor(0.1 * 32)
    assert ex[1]["0.weight"].rank == 1  # max(1, floor(0.1 * 8))
    assert torch.allclose(ex[2]["2.bias"], fts[2].state_dict()["2.bias"] - shared["2.bias"])  # 1-D kept dense
    v = (fts[1].state_dict()["2.weight"] - shared["2.weight"]).double()
    u, s, vh = torch.linalg.svd(v)
    assert torch.allclose(lr.dense().double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


def test_save_load_exclusives(toy, tmp_path):
    base, fts, *_ = toy
    ex = compress_exclusive(base, fts, density=0.2, exclude="")
    save_exclusives(tmp_path / "ex.safetensors", ex)
    back = load_exclusives(tmp_path / "ex.safetensors")
    assert len(back) == T
    for a, b in zip(ex, back):
        assert set(a) == set(b)
        for k in a:
            da = a[k].dense() if isinstance(a[k], sp.LowRank) else a[k]
            db = b[k].dense() if isinstance(b[k], sp.LowRank) else b[k]
            assert torch.equal(da, db)


def test_router_training_is_seeded_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 6, generator=g) + torch.eye(6)[torch.arange(90) % 3] * 3
    ids = torch.arange(90) % 3
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        r = TwinRouter(6, 3)
        before = torch.get_rng_state()
        rep = train_router(r, feats, ids, epochs=5, batch_size=16, seed=7)
        assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched by training
        states.append(r.state_dict())
        assert 0 <= rep["best_accuracy"] <= 1 and len(rep["history"]) == 5
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_bad_inputs(toy):
    base, fts, tests, xs, ids = toy
    with pytest.raises(MergeError, match="density"):
        compress_exclusive(base, fts, density=0)
    with pytest.raises(MergeError, match="task ids"):
        build_twin_model(_mlp(), base, fts, xs, ids + 5)
    with pytest.raises(MergeError, match="inputs but"):
        build_twin_model(_mlp(), base, fts, xs[:10], ids, epochs=1)
    with pytest.raises(MergeError, match="routing"):
        TwinMergedModel(_mlp(), [{}], TwinRouter(D, 1), routing="token")
    wrong = [{"0.weight": torch.zeros(3, 3)}]
    with pytest.raises(MergeError, match="shape"):
        TwinMergedModel(_mlp(), wrong, TwinRouter(D, 1))
    with pytest.raises(MergeError, match="task ids"):
        train_router(TwinRouter(D, 2), torch.randn(4, D), torch.tensor([0, 1, 2, 0]))


def test_twin_on_tiny_llama_with_hidden_state_router(tiny_zoo):
    from transformers import AutoModelForCausalLM

    zoo = tiny_zoo("llama")
    fts = [str(zoo[f"ft{i}"]) for i in range(3)]
    module = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (24, 6), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tasks = torch.arange(24) % 3
    twin = build_twin_model(module, str(zoo["base"]), fts, inputs, tasks, feature_fn=hidden_state_features(),
                            density=0.25, epochs=3, batch_size=8)
    names = {s[0] for s in twin._slots[0]}  # embeddings and lm_head are excluded by default
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" in names
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    with torch.no_grad():
        out = twin(input_ids=ids[:3], attention_mask=inputs["attention_mask"][:3])
        assert out.logits.shape == (3, 6, 64) and torch.isfinite(out.logits).all()
        from torch.func import functional_call

        w = twin.routing_weights(input_ids=ids[:1], attention_mask=inputs["attention_mask"][:1])
        ref = functional_call(twin.module, twin.merged_parameters(w[0]), (),
                              {"input_ids": ids[:1], "attention_mask": inputs["attention_mask"][:1]})
        assert torch.allclose(out.logits[:1], ref.logits, atol=1e-5)
        twin.routing = "batch"
        assert twin(input_ids=ids[:3]).logits.shape == (3, 6, 64)


def test_twin_with_tied_embeddings_gpt2():
    from conftest import build_model, perturb

    base = build_model("gpt2", 0)
    fts = [perturb(build_model("gpt2", 0), 10 + i) for i in range(2)]
    ids = torch.randint(3, 64, (8, 5), generator=torch.Generator().manual_seed(1))
    twin = build_twin_model(build_model("gpt2", 0), base, fts, {"input_ids": ids}, torch.arange(8) % 2,
                            feature_fn=hidden_state_features(), exclude="", density=0.5, epochs=2, batch_size=4)
    names = [s[0] for s in twin._slots[0]]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # tied: handled once
    with torch.no_grad():
        out = twin(input_ids=ids[:2])
    assert out.logits.shape == (2, 5, 64) and torch.isfinite(out.logits).all()
