"""PCB-Merging: golden tests against a direct whole-model reference, global vs tensor scope, streamed
order statistics, bad parameters."""
from __future__ import annotations

import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.api import merge_tensors
from mergesmith.methods.base import MergeError


def pcb_reference(T, ratio, clip, lam=1.0, w=None, temp=None, inter="nlp"):
    """Straightforward PCB on the flattened task-vector matrix T [N, P] (sort-based statistics)."""
    n, P = T.shape
    s = T.abs().sort(dim=1).values
    c = int(P * clip)
    lo, hi = s[:, c : c + 1], s[:, P - 1 - c : P - c]
    a = torch.clamp(T.abs(), lo, hi)
    Tc = torch.sign(T) * a
    mm = (a - lo) / (hi - lo)
    intra = torch.exp((temp or n) * mm**2)
    if inter == "nlp":
        cross = torch.tanh(T * T.sum(0))
    else:
        cross = torch.tanh(T * (torch.sign(T) * mm).sum(0))
    B = intra * cross
    thr = B.sort(dim=1).values[:, int(P * (1 - ratio))].unsqueeze(1)
    Bc = torch.clamp(B, min=thr)
    scale = (Bc - thr) / (Bc.max(dim=1, keepdim=True).values - thr)
    w = torch.ones(n, 1) if w is None else torch.tensor(w).reshape(n, 1)
    return lam * (scale * w * Tc).sum(0) / scale.sum(0).clamp_min(1e-12)


SHAPES = {"model.embed_tokens.weight": (24, 8), "model.layers.0.w": (8, 8), "model.layers.1.w": (8, 6),
          "model.layers.1.b": (6,), "model.norm.weight": (8,), "scale": ()}


def _zoo(seed=0, n=3, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def _flat(sd, names):
    return torch.cat([sd[k].reshape(-1) for k in names])


@pytest.mark.parametrize("inter", ["nlp", "vision"])
def test_pcb_tensor_scope_matches_reference(inter):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 20, generator=g)
    models = [base + 0.05 * torch.randn(30, 20, generator=g) for _ in range(3)]
    out = merge_tensors("pcb", models, base, ratio=0.2, clip=0.01, scope="tensor", inter=inter, weight=[1.0, 0.5, 2.0], **{"lambda": 1.3})
    T = torch.stack([(m - base).reshape(-1) for m in models])
    ref = base + pcb_reference(T, 0.2, 0.01, 1.3, [1.0, 0.5, 2.0], inter=inter).reshape(30, 20)
    assert torch.allclose(out, ref, atol=1e-6)


def test_pcb_global_scope_is_whole_model():
    """Through the engine: statistics over every tensor at once equal the flattened reference."""
    base, models = _zoo()
    out = merge_state_dicts("pcb", models, base=base, ratio=0.15, clip=0.02)
    names = list(SHAPES)
    T = torch.stack([_flat(m, names) - _flat(base, names) for m in models])
    ref = _flat(base, names) + pcb_reference(T, 0.15, 0.02)
    got = _flat(out, names)
    assert torch.allclose(got, ref, atol=1e-6)
    # and it differs from the per-tensor port
    per_tensor = _flat(merge_state_dicts("pcb", models, base=base, ratio=0.15, clip=0.02, scope="tensor"), names)
    assert not torch.allclose(got, per_tensor, atol=1e-4)


def test_pcb_scopes_agree_on_one_tensor_and_temperature():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, generator=g)
    models = [base + torch.randn(40, generator=g) for _ in range(2)]
    a = merge_tensors("pcb", models, base, ratio=0.3, scope="global", intra_temperature=5.0)
    b = merge_tensors("pcb", models, base, ratio=0.3, scope="tensor", intra_temperature=5.0)
    assert torch.equal(a, b)
    T = torch.stack([m - base for m in models])
    assert torch.allclose(a, base + pcb_reference(T, 0.3, 1e-4, temp=5.0), atol=1e-6)


def test_pcb_drops_the_lowest_scores():
    """ratio=r keeps (about) a fraction r of each task's entries: with r small many coordinates get
    zero total score and stay at the base."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1000, generator=g)
    models = [base + torch.randn(1000, generator=g) for _ in range(2)]
    out = merge_tensors("pcb", models, base, ratio=0.05)
    unchanged = (out == base).float().mean().item()
    assert 0.85 < unchanged < 0.95


@pytest.mark.parametrize("bad", [{"ratio": 0.0}, {"ratio": 1.5}, {"clip": 0.5}, {"inter": "nope"}, {"scope": "layer"}])
def test_pcb_bad_parameters(bad):
    base = torch.zeros(4)
    with pytest.raises(MergeError):
        merge_tensors("pcb", [base + 1, base - 1], base, **bad)


def test_pcb_needs_base_and_two_models():
    with pytest.raises(MergeError):
        merge_tensors("pcb", [torch.ones(3), torch.zeros(3)])
    with pytest.raises(MergeError):
        merge_tensors("pcb", [torch.ones(3)], torch.zeros(3))
