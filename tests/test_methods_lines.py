"""LiNeS: per-block scaling goldens, reductions to task arithmetic, automatic alpha, single-task editing,
layer resolution through the engine; plus the name -> block resolver."""
from __future__ import annotations

import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.api import merge_tensors
from mergesmith.layers import layer_index
from mergesmith.methods.base import MergeError
from mergesmith.methods.lines import lines_factor

SHAPES = {"model.embed_tokens.weight": (10, 4), "model.layers.0.mlp.w": (4, 4), "model.layers.1.mlp.w": (4, 4),
          "model.layers.2.mlp.w": (4, 4), "model.layers.2.mlp.b": (4,), "model.norm.weight": (4,)}
LAYER = {"model.embed_tokens.weight": None, "model.layers.0.mlp.w": 0, "model.layers.1.mlp.w": 1,
         "model.layers.2.mlp.w": 2, "model.layers.2.mlp.b": 2, "model.norm.weight": None}


def _zoo(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def _factor(layer, alpha, beta, L=3):
    return alpha if layer is None else alpha + beta * layer / (L - 1)


def test_lines_factor():
    assert lines_factor(None, 12, 0.3, 0.5) == 0.3
    assert lines_factor(0, 12, 0.3, 0.5) == 0.3
    assert lines_factor(11, 12, 0.3, 0.5) == pytest.approx(0.8)
    assert lines_factor(3, 1, 0.3, 0.5) == 0.3  # one block: alpha, no division by zero


def test_lines_task_arithmetic_golden_through_engine():
    base, models = _zoo()
    out = merge_state_dicts("lines", models, base=base, alpha=0.2, beta=0.6)
    for k in SHAPES:
        tau = sum(m[k] - base[k] for m in models)
        assert torch.allclose(out[k], base[k] + _factor(LAYER[k], 0.2, 0.6) * tau, atol=1e-6), k


def test_lines_reduces_to_task_arithmetic():
    base, models = _zoo()
    out = merge_state_dicts("lines", models, base=base, alpha=0.35, beta=0.0)
    ta = merge_state_dicts("task_arithmetic", models, base=base, **{"lambda": 0.35})
    for k in SHAPES:
        assert torch.allclose(out[k], ta[k], atol=1e-6)


def test_lines_automatic_alpha():
    base, models = _zoo()
    # task arithmetic: alpha = 1/N, default beta 0.5
    out = merge_state_dicts("lines", models, base=base)
    for k in SHAPES:
        tau = sum(m[k] - base[k] for m in models)
        assert torch.allclose(out[k], base[k] + _factor(LAYER[k], 1 / 3, 0.5) * tau, atol=1e-6), k
    # consensus: alpha = (1/N) ||sum tau||_1 / ||tau_consensus||_1 over the whole model
    cons = merge_state_dicts("consensus_ta", models, base=base, k=2, **{"lambda": 1.0})
    total = sum(float(sum(m[k] - base[k] for m in models).abs().sum()) for k in SHAPES)
    merged = sum(float((cons[k] - base[k]).abs().sum()) for k in SHAPES)
    alpha = total / merged / 3
    assert alpha > 1 / 3
    out = merge_state_dicts("lines", models, base=base, merge="consensus_ta", beta=0.4)
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + _factor(LAYER[k], alpha, 0.4) * (cons[k] - base[k]), atol=1e-5), k


@pytest.mark.parametrize("merge", ["ties", "consensus_ties"])
def test_lines_on_ties_family(merge):
    base, models = _zoo()
    ref = merge_state_dicts(merge, models, base=base, density=0.4, **{"lambda": 1.0})
    out = merge_state_dicts("lines", models, base=base, merge=merge, density=0.4, alpha=0.5, beta=1.0)
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + _factor(LAYER[k], 0.5, 1.0) * (ref[k] - base[k]), atol=1e-5), k


def test_lines_single_task_editing():
    base, models = _zoo(n=1)
    same = merge_state_dicts("lines", models, base=base)  # auto alpha = 1, beta = 1 - alpha = 0
    for k in SHAPES:
        assert torch.allclose(same[k], models[0][k], atol=1e-6)
    edit = merge_state_dicts("lines", models, base=base, alpha=0.25)  # beta = 0.75: last block keeps tau
    for k in SHAPES:
        tau = models[0][k] - base[k]
        assert torch.allclose(edit[k], base[k] + _factor(LAYER[k], 0.25, 0.75) * tau, atol=1e-6), k
    assert torch.allclose(edit["model.layers.2.mlp.w"], models[0]["model.layers.2.mlp.w"], atol=1e-6)


def test_lines_overrides_and_errors():
    b = torch.zeros(3)
    ms = [b + 1.0, b + 2.0]
    out = merge_tensors("lines", ms, b, name="enc.stage_2.x", layer_pattern=r"stage_(\d+)", num_layers=5, alpha=0.1, beta=0.4)
    assert torch.allclose(out, b + (0.1 + 0.4 * 2 / 4) * 3.0)
    with pytest.raises(MergeError):  # block found in the name but L unknown outside the engine
        merge_tensors("lines", ms, b, name="model.layers.3.w")
    with pytest.raises(MergeError):
        merge_tensors("lines", ms, b, merge="slerp")


@pytest.mark.parametrize("name,idx", [
    ("model.layers.12.self_attn.q_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
    ("bert.encoder.layer.7.output.dense.bias", 7), ("vit.blocks.0.norm1.weight", 0),
    ("encoder.block.5.layer.1.DenseReluDense.wi.weight", 5), ("visual.transformer.resblocks.11.ln_1.weight", 11),
    ("layers.4.w", 4), ("model.embed_tokens.weight", None), ("lm_head.weight", None), ("model.norm.weight", None),
    ("transformer.wte.weight", None), ("model.layers_extra.3.w", None), ("model.layers.x.w", None),
])
def test_layer_index(name, idx):
    assert layer_index(name) == idx


def test_layer_index_pattern_override():
    assert layer_index("enc.stage_2.conv", r"stage_(\d+)") == 2
    assert layer_index("model.layers.2.w", r"stage_(\d+)") is None
