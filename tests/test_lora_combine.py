"""Adapter-space LoRA merges on small tensors, against straightforward references written here."""
from __future__ import annotations

import math

import pytest
import torch

from mergesmith.lora.adapter import Factors, lora_scale, pattern_key
from mergesmith.lora.combine import CombineOptions, dense_delta, merge_factors, merged_bias
from mergesmith.lora.lego import kmeans
from mergesmith.methods.base import MergeError


def _factors(seed, r, out=6, inn=5, scale=1.0, bias=False):
    g = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), scale,
                   torch.randn(out, generator=g) if bias else None)


@pytest.fixture
def trio():
    return [_factors(1, 3, scale=2.0), _factors(2, 2, scale=0.5), _factors(3, 4, scale=1.5)]


def _sum(inputs, weights):
    return sum(w * f.scale * (f.B @ f.A) for f, w in zip(inputs, weights) if f is not None)


def test_scaling_rules():
    assert lora_scale(16, 4, False) == 4.0
    assert lora_scale(16, 4, True) == 8.0  # rsLoRA: alpha / sqrt(r)


def test_pattern_key_matches_peft_semantics():
    pats = ["v_proj", "layers.1.self_attn.q_proj"]
    assert pattern_key(pats, "model.layers.0.self_attn.v_proj") == "v_proj"
    assert pattern_key(pats, "model.layers.1.self_attn.q_proj") == "layers.1.self_attn.q_proj"
    assert pattern_key(pats, "model.layers.11.self_attn.q_proj") is None
    assert pattern_key(pats, "model.layers.0.self_attn.xv_proj") is None


def test_cat_is_exact_with_different_ranks(trio):
    w = [0.7, -1.2, 0.4]
    A, B = merge_factors(CombineOptions("cat", w), "m", trio)
    assert A.shape[0] == 3 + 2 + 4
    torch.testing.assert_close(B @ A, _sum(trio, w), rtol=1e-5, atol=1e-5)


def test_missing_module_counts_as_zero(trio):
    inputs = [trio[0], None, trio[2]]
    w = [1.0, 5.0, 2.0]
    A, B = merge_factors(CombineOptions("cat", w), "m", inputs)
    torch.testing.assert_close(B @ A, _sum(inputs, w), rtol=1e-5, atol=1e-5)
    A, B = merge_factors(CombineOptions("svd", w, rank=5), "m", inputs)
    torch.testing.assert_close(B @ A, _sum(inputs, w), rtol=1e-4, atol=1e-4)


def test_svd_full_rank_exact_and_truncation_is_best_rank_k(trio):
    w = [1.0, 0.5, 2.0]
    ref = _sum(trio, w)
    A, B = merge_factors(CombineOptions("svd", w, rank=5), "m", trio)
    torch.testing.assert_close(B @ A, ref, rtol=1e-4, atol=1e-4)
    A, B = merge_factors(CombineOptions("svd", w, rank=2), "m", trio)
    s = torch.linalg.svdvals(ref)
    err = torch.linalg.matrix_norm(ref - B @ A)
    assert A.shape == (2, 5) and B.shape == (6, 2)
    assert math.isclose(err.item(), s[2:].pow(2).sum().sqrt().item(), rel_tol=1e-4)
    # default rank: the largest input rank (4)
    A, _ = merge_factors(CombineOptions("svd", w), "m", trio)
    assert A.shape[0] == 4


def test_svd_clamp_bounds_factors(trio):
    A, B = merge_factors(CombineOptions("svd", [1, 1, 1], svd_clamp=0.5), "m", trio)
    joint = torch.cat([B.reshape(-1), A.reshape(-1)])
    U, S, Vh = torch.linalg.svd(_sum(trio, [1, 1, 1]), full_matrices=False)
    ref = torch.cat([(U[:, :4] * S[:4]).reshape(-1), Vh[:4].reshape(-1)])
    hi = torch.quantile(ref, 0.5)
    assert joint.abs().max() <= hi.abs() + 1e-6


def test_linear_is_peft_factorwise_average():
    fs = [_factors(4, 3, scale=2.0), _factors(5, 3, scale=0.25)]
    w = [0.5, -2.0]
    A, B = merge_factors(CombineOptions("linear", w), "m", fs)
    c = [w[i] * fs[i].scale for i in range(2)]
    refA = sum(math.copysign(math.sqrt(abs(ci)), ci) * f.A for ci, f in zip(c, fs))
    refB = sum(math.sqrt(abs(ci)) * f.B for ci, f in zip(c, fs))
    torch.testing.assert_close(A, refA)
    torch.testing.assert_close(B, refB)
    # cross terms: not the sum of the deltas
    assert not torch.allclose(B @ A, _sum(fs, w), atol=1e-3)


def test_linear_pads_smaller_ranks(trio):
    A, B = merge_factors(CombineOptions("linear", [1, 1, 1]), "m", trio)
    assert A.shape == (4, 5) and B.shape == (6, 4)


def _peft_prune(x, density):  # keep the top int(d*n) |x| (PEFT magnitude_based_pruning)
    k = int(density * x.numel())
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[x.abs().reshape(-1).argsort(descending=True)[:k]] = True
    return x * keep.reshape(x.shape)


def _peft_ties(xs, w, density, method="total"):
    xs = torch.stack([_peft_prune(x, density) for x in xs])
    mag = xs.sum(0) if method == "total" else xs.sign().sum(0)
    major = torch.where(mag >= 0, 1.0, -1.0)
    mask = xs.sign() == major
    weighted = xs * torch.tensor(w).reshape(-1, 1, 1)
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


@pytest.mark.parametrize("sign,w", [("total", [1.0, 0.6, 1.4]), ("frequency", [1.0, 0.6, 1.4]), ("total", [1.0, -0.8, 0.5])])
def test_ties_on_deltas_matches_reference(trio, sign, w):
    got = dense_delta(CombineOptions("ties", w, density=0.4, majority_sign=sign), "m", trio)
    ref = _peft_ties([f.delta() for f in trio], w, 0.4, sign)
    torch.testing.assert_close(got, ref)
    A, B = merge_factors(CombineOptions("ties_svd", w, density=0.4, majority_sign=sign, rank=5), "m", trio)
    torch.testing.assert_close(B @ A, ref, rtol=1e-4, atol=1e-4)


def test_magnitude_prune_on_deltas(trio):
    w = [1.0, -0.5, 2.0]
    got = dense_delta(CombineOptions("magnitude_prune", w, density=0.3), "m", trio)
    ref = sum(wi * _peft_prune(f.delta(), 0.3) for wi, f in zip(w, trio))
    torch.testing.assert_close(got, ref)


def test_factorwise_ties_prunes_factors_separately():
    fs = [_factors(7, 3, scale=2.0), _factors(8, 3, scale=0.5)]
    w = [1.0, 1.0]
    A, B = merge_factors(CombineOptions("factorwise_ties", w, density=0.5), "m", fs)
    c = [wi * f.scale for wi, f in zip(w, fs)]
    refA = _peft_ties([f.A for f in fs], [math.sqrt(ci) for ci in c], 0.5)
    refB = _peft_ties([f.B for f in fs], [math.sqrt(ci) for ci in c], 0.5)
    torch.testing.assert_close(A, refA)
    torch.testing.assert_close(B, refB)


def test_dare_linear_drops_and_rescales_reproducibly():
    f = _factors(9, 3)
    opts = CombineOptions("dare_linear", [1.0], density=0.5, seed=3)
    got = dense_delta(opts, "layer.q", [f])
    full = f.delta()
    kept = got != 0
    assert 0.2 < kept.float().mean().item() < 0.8
    torch.testing.assert_close(got[kept], full[kept] / 0.5)
    torch.testing.assert_close(dense_delta(opts, "layer.q", [f]), got)  # same seed, same name
    assert not torch.equal(dense_delta(CombineOptions("dare_linear", [1.0], density=0.5, seed=4), "layer.q", [f]), got)
    # density 1 keeps everything: the plain weighted sum
    torch.testing.assert_close(dense_delta(CombineOptions("dare_ties", [1.0], density=1.0), "m", [f]), full)


def test_bias_is_combined_linearly():
    fs = [_factors(1, 2, scale=2.0, bias=True), _factors(2, 2, scale=3.0), _factors(3, 2, scale=0.5, bias=True)]
    got = merged_bias(fs, [1.0, 1.0, -2.0])
    torch.testing.assert_close(got, 2.0 * fs[0].bias - 1.0 * fs[2].bias)
    assert merged_bias([fs[1]], [1.0]) is None


def test_lego_single_adapter_is_identity():
    f = _factors(11, 4, scale=1.7)
    A, B = merge_factors(CombineOptions("lego", [1.0]), "m", [f])
    torch.testing.assert_close(B @ A, f.delta(), rtol=1e-5, atol=1e-5)


def test_lego_identical_and_sign_flipped_adapters_average_back():
    f = _factors(12, 4, scale=2.0)
    flipped = Factors(-f.A, -f.B, f.scale)  # same ΔW, opposite factor signs
    A, B = merge_factors(CombineOptions("lego", [1.0, 1.0]), "m", [f, flipped])
    assert A.shape[0] == 4
    torch.testing.assert_close(B @ A, f.delta(), rtol=1e-5, atol=1e-5)


def test_lego_all_singletons_is_cat_with_output_reweighting(trio):
    w = [1.0, 2.0, 0.5]
    A, B = merge_factors(CombineOptions("lego", w, rank=100), "m", trio)
    assert A.shape[0] == 9
    torch.testing.assert_close(B @ A, _sum(trio, w) * math.sqrt(4 / 9), rtol=1e-5, atol=1e-5)


def test_lego_parameter_reweighting_restores_member_norm():
    # two MSUs that cluster together but point differently: the centroid is rescaled to their mean norm
    a1, b1 = torch.tensor([[1.0, 0.2]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[1.0, -0.2]]), torch.tensor([[0.8], [0.1]])
    fs = [Factors(a1, b1, 1.0), Factors(a2, b2, 1.0)]
    A, B = merge_factors(CombineOptions("lego", [1.0, 1.0], rank=1), "m", fs)
    members = torch.stack([torch.cat([a1[0], b1[:, 0]]), torch.cat([a2[0], b2[:, 0]])])
    mu = members.mean(0)
    target = members.abs().amax(1).mean()
    ref = mu * target / mu.abs().amax()
    torch.testing.assert_close(torch.cat([A[0], B[:, 0]]), ref)  # output factor sqrt(1/1) = 1
    A2, B2 = merge_factors(CombineOptions("lego", [1.0, 1.0], rank=1, lego_norm="none"), "m", fs)
    torch.testing.assert_close(torch.cat([A2[0], B2[:, 0]]), mu)


def test_lego_seeded(trio):
    opts = CombineOptions("lego", [1, 1, 1], rank=3, seed=5)
    A1, B1 = merge_factors(opts, "m", trio)
    A2, B2 = merge_factors(opts, "m", trio)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)


def test_kmeans_finds_obvious_clusters():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 2, generator=g) * 0.01 + 5, torch.randn(10, 2, generator=g) * 0.01 - 5])
    assign = kmeans(x, 2, 10, torch.Generator().manual_seed(1))
    assert len(set(assign[:10].tolist())) == 1 and len(set(assign[10:].tolist())) == 1
    assert assign[0] != assign[10]


def test_option_errors():
    with pytest.raises(MergeError, match="needs a density"):
        CombineOptions("ties", [1.0])
    with pytest.raises(MergeError, match="Did you mean 'cat'"):
        CombineOptions("catt", [1.0])
    with pytest.raises(MergeError, match="majority_sign"):
        CombineOptions("ties", [1.0], density=0.5, majority_sign="count")
    with pytest.raises(MergeError, match="density"):
        CombineOptions("dare_linear", [1.0], density=1.5)
    with pytest.raises(MergeError, match="rank"):
        CombineOptions("svd", [1.0], rank=0)
    assert CombineOptions("dare_ties_svd", [1.0], density=0.5).method == "dare_ties"


def test_lowrank_kernels():
    from mergesmith.methods.kernels import lowrank_factors, svd_of_product

    g = torch.Generator().manual_seed(0)
    B0, A0 = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    U, S, Vh = svd_of_product(B0, A0)
    torch.testing.assert_close(S, torch.linalg.svdvals(B0 @ A0)[:6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((U * S) @ Vh, B0 @ A0, rtol=1e-4, atol=1e-4)
    x = B0 @ A0 + 1e-3 * torch.randn(40, 30, generator=g)
    A, B, _ = lowrank_factors(x, 4, method="exact")
    Ar, Br, Sr = lowrank_factors(x, 4, split="sqrt", method="randomized", oversample=4)
    assert Sr.numel() == 8  # only the computed top values
    best = torch.linalg.matrix_norm(x - B @ A)
    assert torch.linalg.matrix_norm(x - Br @ Ar) <= best * 1.01
    assert Ar.shape == (4, 30) and Br.shape == (40, 4)
