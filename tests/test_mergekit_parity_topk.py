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
