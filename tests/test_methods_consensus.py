"""TALL masks and Consensus Merging (TA and TIES): hand-computed goldens, identities, whole-model TIES."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesmith import merge_state_dicts
from mergesmith.api import merge_tensors
from mergesmith.methods.base import MergeError
from mergesmith.methods.kernels import tall_masks

TAUS = torch.tensor([
    [1.0, 0.0, 2.0, -1.0, 0.3],
    [1.0, 0.0, -2.0, 0.2, 0.0],
    [0.1, 0.0, 0.0, -1.0, 0.0],
])
BASE = torch.tensor([0.5, -1.0, 0.25, 2.0, 1.0])


def test_tall_masks_hand_computed():
    merged = TAUS.sum(0)  # [2.1, 0, 0, -1.8, 0.3]
    paper = tall_masks(TAUS, merged, 0.5)
    assert paper.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
    strict = tall_masks(TAUS, merged, 0.5, strict=True)
    assert strict.int().tolist() == [[1, 0, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    per_task = tall_masks(TAUS, merged, [0.5, 0.1, 2.0])
    assert per_task.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]]


@pytest.mark.parametrize("k,kept", [(0, [1, 1, 1, 1, 1]), (1, [1, 1, 1, 1, 1]), (2, [1, 1, 1, 1, 0]), (3, [0, 1, 1, 0, 0]), (4, [0, 0, 0, 0, 0])])
def test_consensus_ta_hand_computed(k, kept):
    models = [BASE + t for t in TAUS]
    out = merge_tensors("consensus_ta", models, BASE, k=k, mask_lambda=0.5, **{"lambda": 0.5})
    expected = BASE + 0.5 * TAUS.sum(0) * torch.tensor(kept, dtype=torch.float32)
    assert torch.allclose(out, expected, atol=1e-7)


def test_consensus_identities():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 10, generator=g)
    models = [base + 0.1 * torch.randn(20, 10, generator=g) for _ in range(3)]
    # k = 0: the base merge itself
    ta = merge_tensors("task_arithmetic", models, base, **{"lambda": 0.7})
    assert torch.allclose(merge_tensors("consensus_ta", models, base, k=0, **{"lambda": 0.7}), ta, atol=1e-6)
    ties = merge_tensors("ties", models, base, density=0.3, agg="sum", **{"lambda": 0.7})
    assert torch.allclose(merge_tensors("consensus_ties", models, base, k=0, density=0.3, **{"lambda": 0.7}), ties, atol=1e-6)
    # k > N: the base model
    assert torch.equal(merge_tensors("consensus_ta", models, base, k=4), base)
    assert torch.equal(merge_tensors("consensus_ties", models, base, k=4), base)
    # consensus removes something with k = 2 on dense random task vectors
    assert not torch.allclose(merge_tensors("consensus_ta", models, base, k=2), merge_tensors("task_arithmetic", models, base))


def ties_sum_reference(T: torch.Tensor, density: float) -> torch.Tensor:
    """Official TIES on flattened task vectors T [N, P]: keep |t| >= (P - floor(dP))-th smallest, elect
    the mass sign (0 -> global majority), disjoint sum."""
    n, P = T.shape
    trimmed = T.clone()
    for i in range(n):
        thr = T[i].abs().sort().values[P - int(density * P) - 1]
        trimmed[i] = T[i] * (T[i].abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    major = torch.sign(sign.sum()) or torch.tensor(1.0)
    sign[sign == 0] = major
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0)


def consensus_reference(T, merged, lam, k):
    out = merged.clone()
    for p in range(T.shape[1]):
        count = sum(int(abs(T[t, p]) >= lam * abs(merged[p] - T[t, p])) for t in range(T.shape[0]))
        if count < k:
            out[p] = 0.0
    return out


SHAPES = {"model.embed_tokens.weight": (12, 4), "model.layers.0.w": (4, 4), "model.layers.1.w": (4, 4),
          "model.layers.1.b": (4,), "model.norm.weight": (4,)}


def test_consensus_ties_global_scope_is_whole_model():
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    names = list(SHAPES)
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in names])  # noqa: E731
    T = torch.stack([flat(m) - flat(base) for m in models])
    merged = ties_sum_reference(T, 0.3)
    expected = flat(base) + 0.4 * consensus_reference(T, merged, 0.6, 2)
    out = merge_state_dicts("consensus_ties", models, base=base, density=0.3, mask_lambda=0.6, k=2, **{"lambda": 0.4})
    assert torch.allclose(flat(out), expected, atol=1e-6)
    per_tensor = merge_state_dicts("consensus_ties", models, base=base, density=0.3, mask_lambda=0.6, k=2, scope="tensor",
                                   **{"lambda": 0.4})
    assert not torch.allclose(flat(per_tensor), expected, atol=1e-4)
    # consensus TA over the same zoo is element-wise: equal to the flattened reference too
    out_ta = merge_state_dicts("consensus_ta", models, base=base, mask_lambda=0.6, k=2)
    assert torch.allclose(flat(out_ta), flat(base) + consensus_reference(T, T.sum(0), 0.6, 2), atol=1e-6)


def test_consensus_per_model_mask_lambda_and_strict():
    models = [BASE + t for t in TAUS]
    out = merge_tensors("consensus_ta", models, BASE, k=2, mask_lambda=[0.5, 0.1, 2.0])
    # per-task masks from the hand computation above: counts [2, 3, 3, 2, 1]
    assert torch.allclose(out, BASE + TAUS.sum(0) * torch.tensor([1.0, 1, 1, 1, 0]))
    strict = merge_tensors("consensus_ta", models, BASE, k=2, strict=True)
    assert torch.allclose(strict, BASE + TAUS.sum(0) * torch.tensor([1.0, 0, 1, 1, 0]))


def test_consensus_errors():
    with pytest.raises(MergeError):
        merge_tensors("consensus_ta", [BASE + 1], BASE)  # needs two models
    with pytest.raises(MergeError):
        merge_tensors("consensus_ta", [BASE + 1, BASE - 1])  # needs the base
    with pytest.raises(MergeError):
        merge_tensors("consensus_ties", [BASE + 1, BASE - 1], BASE, density=1.5)


@pytest.mark.parametrize("k", [0, 1])
def test_consensus_ties_gets_the_global_majority_sign_where_signs_cancel(k, tmp_path):
    """A coordinate whose task vectors cancel exactly (+a, -a) takes the whole model's majority sign
    (negative here), with the consensus mask and the base applied, in memory and through a folder. A
    regression test: the engine used to settle that sign after the last tensor by patching the output with
    the TIES pipeline's own values, which skipped the base and the mask."""
    from safetensors.torch import load_file, save_file

    from mergesmith.run import run_recipe

    base = {"w": torch.full((4, 8), 1.0)}
    t1, t2 = torch.full((4, 8), -0.5), torch.full((4, 8), -0.25)
    t1[0, 0], t2[0, 0] = 0.5, -0.5
    models = [{"w": base["w"] + t1}, {"w": base["w"] + t2}]
    kw = dict(density=1.0, k=k, mask_lambda=0.5, **{"lambda": 1.0})
    got = merge_state_dicts("consensus_ties", models, base=base, **kw)["w"]
    # reference: elected sign -1 at [0, 0] (global majority), disjoint sum there = -0.5 (t2 alone);
    # elsewhere both agree (negative): sum -0.75. TALL masks against tau = that sum, lambda_t 0.5.
    tau = torch.full((4, 8), -0.75)
    tau[0, 0] = -0.5
    d = torch.stack([t1, t2])
    count = (d.abs() >= 0.5 * (tau - d).abs()).sum(0)
    want = base["w"] + tau * (count >= k)
    assert torch.equal(got, want)
    assert got[0, 0].item() == (0.5 if k <= count[0, 0].item() else 1.0)
    for name, sd in [("base", base), ("m0", models[0]), ("m1", models[1])]:
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    run_recipe({"merge_method": "consensus_ties", "base_model": str(tmp_path / "base"), "parameters": kw,
                "models": [{"model": str(tmp_path / "m0")}, {"model": str(tmp_path / "m1")}]}, tmp_path / "out")
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], want)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("params", [{"k": 2, "lambda": 0.5}, {"k": 1, "mask_lambda": [0.2, 0.6, 0.4], "strict": True},
                                    {"k": 3, "lambda": 1.3}, {"k": 0}])
def test_consensus_ta_kernel_equals_the_torch_ops(tmp_path, monkeypatch, stored, params):
    """The fused block kernel (inputs as stored, on the kernel threads) writes the bytes of the torch
    path, on quantized values (exact ties of |tau_t| and lambda_t |tau - tau_t|, signed zeros)."""
    import mergesmith.methods._fused as F
    import mergesmith.methods._sampling as S
    from safetensors.torch import load_file, save_file

    from mergesmith.run import run_recipe

    if not F.enabled():
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(8)
    shapes = {"a.weight": (40, 33), "b.weight": (7, 64)}
    base = {k: torch.randint(-4, 5, s, generator=g).float() * 0.25 for k, s in shapes.items()}
    models = [{k: v + torch.randint(-2, 3, v.shape, generator=g).float() * 0.125 for k, v in base.items()}
              for _ in range(3)]
    dt = getattr(torch, stored)
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file({k: v.to(dt).contiguous() for k, v in sd.items()}, tmp_path / name / "model.safetensors")
    recipe = {"merge_method": "consensus_ta", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": str(tmp_path / f"m{i}")} for i in range(3)], "parameters": params}
    calls = []
    real = F.consensus_ta
    monkeypatch.setattr(F, "consensus_ta", lambda ts, *a: calls.append(ts[0].dtype) or real(ts, *a))
    monkeypatch.setattr(S, "BLOCK", 64)  # several blocks per tensor, on two kernel threads
    run_recipe(recipe, tmp_path / "fused")
    assert set(calls) == {np.dtype(np.int16 if stored == "bfloat16" else np.float32)}  # bf16: the bits as stored
    monkeypatch.setenv("MERGESMITH_FUSED", "0")
    run_recipe(recipe, tmp_path / "torch")
    a, b = load_file(tmp_path / "fused" / "model.safetensors"), load_file(tmp_path / "torch" / "model.safetensors")
    for k in shapes:
        assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
