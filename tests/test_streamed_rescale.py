"""DARE / DELLA / Breadcrumbs with mergekit's l1 (or l2) rescale on tensors too big to hold whole: one sums phase
over the row chunks gives each model's whole-tensor norm ratio (``methods/_tensor_norms.py``), then the apply
chunks scale by it. One factor per tensor and model, and the norm of the rescaled task vector is the original's."""
from __future__ import annotations

import pytest
import torch

from mergesmith.engine import DictSink
from mergesmith.run import plan_recipe


def _streamed(tiny_zoo, monkeypatch, method, params, models=1):
    import mergesmith.engine as E

    z = tiny_zoo("llama")
    recipe = {"merge_method": method, "base_model": str(z["base"]), "dtype": "float32",
              "models": [{"model": str(z[f"ft{i}"])} for i in range(models)], "parameters": params}
    plan = plan_recipe(recipe)
    monkeypatch.setattr(E, "PREFETCH_BYTES", 1024)  # every matrix counts as too big to hold whole
    ex = E.Executor(plan, DictSink(plan), chunk_elements=300)
    job = next(j for j in plan.jobs if j.out_name.endswith("mlp.up_proj.weight"))
    phases = [u.phase for u in ex._units(job)]
    assert phases.count("sums") == phases.count("apply") > 3  # one sums phase over the chunks
    ex.run()
    from conftest import load_state

    return ex.sink.tensors, load_state(z["base"]), load_state(z["ft0"]), job.out_name


@pytest.mark.parametrize("method,params", [
    ("dare_linear", {"density": 0.5, "rescale": "l1", "weight": 1.0, "lambda": 1.0}),
    ("dare_ties", {"density": 0.4, "rescale": "l1", "ties_density": 1.0, "weight": 1.0, "lambda": 1.0,
                   "zero_sign": "positive"}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1, "rescale": "l1", "weight": 1.0, "lambda": 1.0}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.1, "rescale": "l1", "weight": 1.0, "lambda": 1.0}),
    ("dare_linear", {"density": 0.5, "rescale": "l2", "weight": 1.0, "lambda": 1.0}),
])
def test_one_rescale_factor_per_tensor_over_its_chunks(tiny_zoo, monkeypatch, method, params):
    out, base, ft, name = _streamed(tiny_zoo, monkeypatch, method, params)
    tau = (ft[name] - base[name]).double()
    got = (out[name].double() - base[name].double())
    kept = (got != 0) & (tau != 0)
    ratio = got[kept] / tau[kept]
    assert 0.2 < kept.double().mean() < 0.9
    # one factor for the whole tensor (per-chunk norms would give one per 300-element chunk: several % apart)
    assert float(ratio.max() - ratio.min()) < 1e-4 * float(ratio.mean())
    order = 1 if params["rescale"] == "l1" else 2
    assert torch.allclose(torch.linalg.vector_norm(got, order), torch.linalg.vector_norm(tau, order), rtol=1e-5)


def test_streamed_draws_are_reproducible(tiny_zoo, monkeypatch):
    params = {"density": 0.5, "rescale": "l1", "weight": 1.0, "lambda": 1.0}
    a, *_ = _streamed(tiny_zoo, monkeypatch, "dare_ties", params, models=2)
    b, *_ = _streamed(tiny_zoo, monkeypatch, "dare_ties", params, models=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["l1", "l2", "none"])
def test_in_place_rescale_is_the_rescale_of_the_masked_copy(mode):
    """kernels.rescale_ (mask in place, norms before and after) gives the bytes of rescale(t, t * keep, mode)."""
    from mergesmith.methods import kernels as K
    from mergesmith.methods import _sampling as S

    g = torch.Generator().manual_seed(2)
    for t, d in [(torch.randn(300, 70, generator=g), 0.4), (torch.randn(5000, generator=g) * 1e-9, 0.5),
                 (-torch.rand(64, 64, generator=g), 0.0), (torch.randn(40, 40, generator=g), 1.0)]:
        mask = K.bernoulli_mask(t.shape, d, 77)
        want = K.rescale(t, t * mask, mode)
        got = K.rescale_(t.clone(), lambda x: x.mul_(mask), mode)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
        drawn = K.rescale_(t.clone(), lambda x: S.drop_(x, d, 77), mode)  # DARE's fused in-place draw
        assert torch.equal(drawn, want) and torch.equal(drawn.signbit(), want.signbit())
        assert torch.equal(K.rescale_(t.clone(), lambda x: x.mul_(mask), mode, factor=1.5), K.rescale(t, t * mask, mode, factor=1.5))
