"""Exact top-k ties are broken by index, as mergekit's (stable, CPU) argsort does.

Regression test for a mergekit parity mismatch found by benchmarks/mergekit_parity.py: on tensors with
repeated |tau| values at the threshold, torch.topk kept arbitrary tied entries (docs/mergekit_parity.md).
"""
import torch

from mergesmith.methods.kernels import topk_mask


def _reference(x: torch.Tensor, density: float) -> torch.Tensor:
    flat = x.reshape(-1).abs()
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return mask.reshape(x.shape)


def test_exact_topk_breaks_ties_by_lowest_index():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5])
    # k = int(0.5 * 7) = 3: both 3s, then the first of the three tied 2s (index 2)
    assert topk_mask(x, 0.5).tolist() == [False, True, True, True, False, False, False]


def test_exact_topk_matches_stable_argsort_on_tie_heavy_tensors():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 200, (1,), generator=g))
        x = torch.randint(-4, 5, (n,), generator=g).float().reshape(-1, 1) if n % 2 else torch.randint(-4, 5, (n,), generator=g).float()
        d = float(torch.rand(1, generator=g))
        m = topk_mask(x, d)
        assert int(m.sum()) == max(1, int(d * x.numel()))
        assert torch.equal(m, _reference(x, d))


import pytest  # noqa: E402


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_exact_topk_block_path_equals_the_whole_tensor_path(stored, fused, monkeypatch):
    """mergekit's TIES (exact top-k per tensor) on a tensor of several blocks runs block by block, trimming
    strictly above the k-th largest |tau| and patching the kept ties afterwards: the same bytes as the
    whole-tensor path (topk_mask), on tie-heavy bf16-like task vectors, zero ties, density 0 and 1 included."""
    from conftest import on_torch_path

    from mergesmith import merge_state_dicts
    from mergesmith.methods._gta import Pipeline

    g = torch.Generator().manual_seed(3)
    base = (torch.randn(520, 512, generator=g) * 0.02).to(stored)
    models = []
    for i in range(3):
        step = torch.randint(-3, 4, (520, 512), generator=g).float() * 2.0 ** -12  # few distinct |tau|: many ties
        step[i * 100:(i + 1) * 100] = 0.0  # rows a model left unchanged: ties at zero
        models.append({"w": (base.float() + step).to(stored)})
    mk = dict(scope="tensor", exact_topk=True, weighted_elect=True, zero_sign="positive", normalize=True)
    for dens in ([0.3, 0.55, 0.9], [0.0, 1.0, 0.2], [0.05, 0.05, 0.05]):
        def run():
            return merge_state_dicts("ties", models, base={"w": base}, density=dens, weight=[1.0, 0.5, 0.8], **mk)["w"]

        got = run() if fused else on_torch_path(monkeypatch, run)
        with monkeypatch.context() as m:
            m.setattr(Pipeline, "blockable", lambda *a: False)
            want = run()
        assert got.dtype == want.dtype == stored
        assert torch.equal(got, want), dens


@pytest.mark.parametrize("chunk_elements", [300_000, 2_000])  # chunks of several blocks; chunks under one block
@pytest.mark.parametrize("exact", [True, False])
def test_per_tensor_trim_streamed_over_row_chunks_equals_the_whole_tensor(tmp_path, monkeypatch, exact, chunk_elements):
    """A tensor too big to hold whole is trimmed per tensor from two histogram passes over its row chunks
    (``_tensor_trim``): the k-th largest |tau| of the whole tensor, and for the exact top-k the ties each chunk
    keeps (the lowest flat indices overall): the same bytes as the tensor held whole, on tie-heavy bf16 inputs."""
    from safetensors.torch import save_file

    import mergesmith.engine as E
    from mergesmith.engine import DictSink, execute
    from mergesmith.run import plan_recipe

    g = torch.Generator().manual_seed(11)
    base = torch.randn(2100, 512, generator=g) * 0.02
    paths = []
    for i in range(4):
        step = torch.randint(-3, 4, base.shape, generator=g).float() * 2.0 ** -12 if i else 0.0
        (tmp_path / f"m{i}").mkdir()
        save_file({"w": (base + step).to(torch.bfloat16).contiguous()}, str(tmp_path / f"m{i}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{i}"))
    params = {"density": [0.3, 0.62, 0.05], "scope": "tensor", "zero_sign": "positive", "weighted_elect": True}
    if exact:
        params["exact_topk"] = True
    recipe = {"merge_method": "ties", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
              "parameters": params, "dtype": "bfloat16"}
    plan = plan_recipe(recipe)
    whole, streamed = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    monkeypatch.setattr(E, "PREFETCH_BYTES", 1024)  # every tensor counts as too big to hold whole
    ex = E.Executor(plan, streamed, chunk_elements=chunk_elements)
    assert [u.phase for u in ex._units(plan.jobs[0])].count("sums") > 2
    ex.run()
    assert torch.equal(streamed.tensors["w"], whole.tensors["w"])
