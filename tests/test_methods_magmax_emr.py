"""MagMax and EMR-Merging: element-loop references, identities, whole-model rescalers, errors."""
from __future__ import annotations

import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.api import merge_tensors
from mergesmith.methods.base import MergeError

SHAPES = {"model.embed_tokens.weight": (6, 4), "model.layers.0.w": (4, 3), "model.layers.0.b": (3,), "norm": ()}


def _zoo(n=3, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def _flat(sd):
    return torch.cat([sd[k].reshape(-1) for k in SHAPES])


def test_magmax_reference_and_ties():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    models = [base + torch.randn(7, 5, generator=g) for _ in range(3)]
    out = merge_tensors("magmax", models, base, **{"lambda": 0.7})
    T = [(m - base).reshape(-1) for m in models]
    expected = base.reshape(-1).clone()
    for p in range(expected.numel()):
        best = max(range(3), key=lambda i: (abs(T[i][p].item()), -i))  # first model wins ties
        expected[p] += 0.7 * T[best][p]
    assert torch.allclose(out.reshape(-1), expected, atol=1e-6)
    # exact magnitude tie with opposite signs: the first model's entry is kept
    b = torch.zeros(2)
    tie = merge_tensors("magmax", [b + torch.tensor([-1.0, 2.0]), b + torch.tensor([1.0, -3.0])], b, **{"lambda": 1.0})
    assert tie.tolist() == [-1.0, -3.0]
    # one model and lambda 1: the model itself
    assert torch.allclose(merge_tensors("magmax", [models[0]], base, **{"lambda": 1.0}), models[0])


def emr_reference(T: torch.Tensor, mode: str = "paper", sizes=None):
    """Element loops: unified vector, masks, rescalers (paper: whole-model L1 sums; code: per-tensor means)."""
    n, P = T.shape
    tau = torch.zeros(P)
    masks = torch.zeros(n, P, dtype=torch.bool)
    for p in range(P):
        g = 1.0 if T[:, p].sum() > 0 else -1.0
        agree = [abs(T[i, p].item()) for i in range(n) if T[i, p] * g > 0]
        tau[p] = g * (max(agree) if agree else 0.0)
        for i in range(n):
            masks[i, p] = bool(T[i, p] * tau[p] > 0)
    scales = []
    for i in range(n):
        num, den = T[i].abs(), (masks[i] * tau).abs()
        if mode == "paper":
            scales.append(float(num.sum() / den.sum()))
        else:
            parts = torch.split(torch.arange(P), sizes)
            scales.append(sum(float(num[ix].mean()) for ix in parts) / sum(float(den[ix].mean()) for ix in parts))
    return tau, masks, scales


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_emr_whole_model_reference(mode):
    base, models = _zoo()
    T = torch.stack([_flat(m) - _flat(base) for m in models])
    sizes = [max(1, torch.Size(s).numel()) for s in SHAPES.values()]
    tau, masks, scales = emr_reference(T, mode, sizes)
    unified = merge_state_dicts("emr", models, base=base, rescale=mode)
    assert torch.allclose(_flat(unified), _flat(base) + tau, atol=1e-6)
    for i in range(3):
        out = merge_state_dicts("emr", models, base=base, task=i, rescale=mode)
        assert torch.allclose(_flat(out), _flat(base) + scales[i] * masks[i] * tau, atol=1e-5)
    if mode == "paper":
        assert len({round(s, 6) for s in scales}) == 3 and all(s < 1 for s in scales)


def test_emr_single_model_is_the_model():
    base, models = _zoo(n=1)
    for task in (-1, 0):
        out = merge_state_dicts("emr", models, base=base, task=task)
        for k in SHAPES:
            assert torch.equal(out[k], base[k] + (models[0][k] - base[k]))
            assert torch.allclose(out[k], models[0][k], atol=1e-6)


def test_emr_errors():
    b = torch.zeros(3)
    with pytest.raises(MergeError):
        merge_tensors("emr", [b + 1, b - 1], b, task=2)
    with pytest.raises(MergeError):
        merge_tensors("emr", [b + 1, b - 1])
    with pytest.raises(MergeError):
        merge_tensors("emr", [b + 1, b - 1], b, rescale="l2")


def test_magmax_selection_equals_argmax_gather_bit_for_bit():
    """The running comparison picks what argmax + gather of the stacked magnitudes picks: first model on
    exact ties, NaN as the largest (first NaN wins), signed zeros kept."""
    from mergesmith.methods.magmax import max_magnitude

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        n = int(torch.randint(1, 5, (1,), generator=g))
        taus = [torch.randint(-3, 4, (300,), generator=g).float() * 0.5 for _ in range(n)]
        for t in taus:
            u = torch.rand(300, generator=g)
            t[u < 0.02] = float("nan")
            t[(u > 0.02) & (u < 0.04)] = -0.0
        d = torch.stack(taus)
        want = d.gather(0, d.abs().argmax(0, keepdim=True)).squeeze(0)
        assert torch.equal(max_magnitude(taus).view(torch.int32), want.view(torch.int32)), trial
