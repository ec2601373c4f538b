"""Golden tests for the spherical methods: slerp, nuslerp, multislerp, karcher."""
from __future__ import annotations

import math

import pytest
import torch

from mergesmith.api import merge_tensors
from mergesmith.methods.base import MergeError

from methods_spherical_helpers import randn, ref_slerp, run


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_angle_formula(t):
    a, b = randn(6, 5, seed=1), randn(6, 5, seed=2)
    close(run("slerp", [b], a, t=t), ref_slerp(t, a, b))


def test_slerp_endpoints_are_the_inputs():
    a, b = randn(7, 3, seed=3), randn(7, 3, seed=4) * 3
    torch.testing.assert_close(run("slerp", [b], a, t=0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(run("slerp", [b], a, t=1.0), b, rtol=0, atol=1e-5)


def test_slerp_orthogonal_unit_vectors_midpoint():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    out = run("slerp", [e2], e1, t=0.5)
    close(out, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    # a quarter of the way: angle pi/8 from e1, still on the unit circle
    out = run("slerp", [e2], e1, t=0.25)
    close(out, torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0]))


def test_slerp_colinear_falls_back_to_lerp():
    a = randn(10, seed=5)
    out = run("slerp", [2.5 * a], a, t=0.3)
    close(out, 0.7 * a + 0.3 * 2.5 * a)
    # nearly colinear (cos > 0.9995) is lerped too, not slerped
    b = a + 0.01 * randn(10, seed=6)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert 0.9995 < cos < 1.0
    close(run("slerp", [b], a, t=0.3), 0.7 * a + 0.3 * b)


def test_slerp_antipodal_falls_back_to_lerp():
    a = randn(4, 4, seed=7)
    out = run("slerp", [-3 * a], a, t=0.4)
    close(out, 0.6 * a + 0.4 * (-3 * a))
    assert torch.isfinite(out).all()


def test_slerp_zero_tensor_is_not_normalised():
    v = randn(5, seed=8)
    out = run("slerp", [v], torch.zeros(5), t=0.3)  # d = 0 -> Omega = pi/2
    close(out, math.sin(0.3 * math.pi / 2) * v)


def test_slerp_scalar_and_dtype():
    out = run("slerp", [torch.tensor(3.0, dtype=torch.bfloat16)], torch.tensor(2.0, dtype=torch.bfloat16), t=0.5)
    assert out.dtype == torch.bfloat16 and out.shape == ()
    assert float(out) == 2.5


def test_slerp_errors():
    a, b = randn(3, seed=9), randn(3, seed=10)
    with pytest.raises(MergeError, match="missing required parameter 't'"):
        run("slerp", [b], a)
    with pytest.raises(MergeError, match="method 'slerp' needs a base model"):
        merge_tensors("slerp", [a, b])
    with pytest.raises(MergeError, match="method 'slerp' takes at most 1 model"):
        merge_tensors("slerp", [a, b], a)
    with pytest.raises(MergeError, match="'t'.*not a valid float"):
        run("slerp", [b], a, t="half")


# ----------------------------------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("t", [0.2, 0.5, 0.75])
def test_nuslerp_flattened_without_base_is_slerp(t):
    a, b = randn(4, 6, seed=11), randn(4, 6, seed=12)
    out = run("nuslerp", [a, b], weight=[1 - t, t])
    close(out, ref_slerp(t, a, b))
    close(out, run("slerp", [b], a, t=t))


def test_nuslerp_weights_give_t():
    a, b = randn(8, seed=13), randn(8, seed=14)
    close(run("nuslerp", [a, b], weight=[1.0, 3.0]), ref_slerp(0.75, a, b))
    close(run("nuslerp", [a, b], weight=[2.0, -2.0]), ref_slerp(0.5, a, b))  # |sum| < 1e-6 -> t = 0.5
    close(run("nuslerp", [a, b]), ref_slerp(0.5, a, b))  # default weights 1, 1


def test_nuslerp_with_base_slerps_task_vectors():
    base, a, b = randn(5, 3, seed=15), randn(5, 3, seed=16), randn(5, 3, seed=17)
    out = run("nuslerp", [a, b], base, weight=[0.6, 0.4])
    close(out, base.double() + ref_slerp(0.4, a - base, b - base))


def test_nuslerp_is_exact_slerp_near_colinear():
    a = randn(10, seed=18)
    b = a + 0.01 * randn(10, seed=19)  # cos > 0.9995: slerp lerps, nuslerp does not
    out = run("nuslerp", [a, b], weight=[0.7, 0.3])
    close(out, ref_slerp(0.3, a, b, threshold=1.0), tol=1e-4)
    colinear = run("nuslerp", [a, 2 * a], weight=[0.5, 0.5])
    close(colinear, 1.5 * a)


def test_nuslerp_per_vector_modes():
    a, b = randn(3, 4, seed=20), randn(3, 4, seed=21)
    rows = run("nuslerp", [a, b], weight=[0.5, 0.5], nuslerp_flatten=False)
    for i in range(3):
        close(rows[i], ref_slerp(0.5, a[i], b[i]))
    cols = run("nuslerp", [a, b], weight=[0.5, 0.5], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(4):
        close(cols[:, j], ref_slerp(0.5, a[:, j], b[:, j]))
    assert not torch.allclose(rows, cols)
    # 1-D tensors are one vector whatever the mode
    v, w = randn(6, seed=22), randn(6, seed=23)
    close(run("nuslerp", [v, w], nuslerp_flatten=False, nuslerp_row_wise=True), ref_slerp(0.5, v, w))


def test_nuslerp_needs_two_models():
    a = randn(3, seed=24)
    with pytest.raises(MergeError, match="method 'nuslerp' needs at least 2 model"):
        merge_tensors("nuslerp", [a])
    with pytest.raises(MergeError, match="method 'nuslerp' takes at most 2 model"):
        merge_tensors("nuslerp", [a, a, a])


# -------------------------------------------------------------------------------------- multislerp


def ref_multislerp(xs, w, base=None, eps=1e-8):
    """Barycentric spherical interpolation, written out step by step in float64."""
    xs = [x.double().reshape(-1) - (base.double().reshape(-1) if base is not None else 0) for x in xs]
    w = [wi / sum(w) for wi in w]
    us = [x / (x.norm() + eps) for x in xs]
    m = sum(wi * u for wi, u in zip(w, us))
    m = m / m.norm()
    g = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, us))
    gn = float(g.norm())
    r = m if gn < 1e-12 else math.cos(gn) * m + math.sin(gn) * g / gn
    out = sum(wi * x.norm() for wi, x in zip(w, xs)) * r
    return out + (base.double().reshape(-1) if base is not None else 0)


def test_multislerp_two_equal_models_is_slerp_half():
    a = randn(12, seed=25)
    b = randn(12, seed=26)
    b = b / b.norm() * a.norm()  # equal norms: slerp(0.5) keeps the norm and the bisecting direction
    close(run("multislerp", [a, b]), ref_slerp(0.5, a, b))
    # unequal norms: direction of slerp(0.5) of the unit vectors, norm = mean of the norms
    c = 3 * b
    out = run("multislerp", [a, c]).double()
    d = ref_slerp(0.5, a / a.norm(), c / c.norm())
    close(out / out.norm(), d / d.norm())
    assert math.isclose(float(out.norm()), (float(a.norm()) + float(c.norm())) / 2, rel_tol=1e-5)


def test_multislerp_matches_reference_three_models():
    xs = [randn(4, 5, seed=s) for s in (27, 28, 29)]
    close(run("multislerp", xs, weight=[1.0, 2.0, 3.0]), ref_multislerp(xs, [1.0, 2.0, 3.0]).reshape(4, 5))
    base = randn(4, 5, seed=30)
    out = run("multislerp", xs, base, weight=[0.2, 0.3, 0.5])
    close(out, ref_multislerp(xs, [0.2, 0.3, 0.5], base).reshape(4, 5))


def test_multislerp_unnormalised_weights_scale_the_norm():
    a, b = randn(6, seed=42), randn(6, seed=43)
    close(run("multislerp", [a, b], weight=[2.0, 2.0], normalize_weights=False), 4 * run("multislerp", [a, b]))


def test_multislerp_antipodal():
    a = randn(6, seed=31)
    close(run("multislerp", [a, -2 * a]), 0.5 * a - a)  # two models: linear fallback
    b = randn(6, seed=32)
    with pytest.raises(MergeError, match="cancel out"):
        run("multislerp", [a, -a, b, -b])
    with pytest.raises(MergeError, match="weights sum to 0"):
        run("multislerp", [a, b], weight=[1.0, -1.0])


def test_multislerp_single_model_is_identity():
    a = randn(3, 3, seed=33)
    torch.testing.assert_close(run("multislerp", [a]), a)
    torch.testing.assert_close(run("multislerp", [a], randn(3, 3, seed=34)), a)


# ----------------------------------------------------------------------------------------- karcher


def test_karcher_identical_vectors():
    v = randn(4, 7, seed=35)
    close(run("karcher", [v, v.clone(), v.clone()]), v)


def test_karcher_two_unit_vectors_is_normalised_midpoint():
    u = randn(9, seed=36)
    w = randn(9, seed=37)
    u, w = u / u.norm(), w / w.norm()
    mid = (u + w) / (u + w).norm()
    close(run("karcher", [u, w]), mid)


def test_karcher_points_on_a_circle_average_their_angles():
    # on a great circle, the Frechet mean of nearby points is at their mean angle
    angles, norms = [0.0, 0.2, 1.0], [1.0, 2.0, 4.0]
    xs = [r * torch.tensor([math.cos(a), math.sin(a), 0.0]) for a, r in zip(angles, norms)]
    out = run("karcher", xs, max_iter=100, tol=1e-7)
    m = sum(angles) / 3
    close(out, sum(norms) / 3 * torch.tensor([math.cos(m), math.sin(m), 0.0]), tol=1e-5)
    # the normalised linear mean is a different (worse) point: the iteration really moved
    lin = sum(x / x.norm() for x in xs)
    assert not torch.allclose(out / out.norm(), lin / lin.norm(), atol=1e-3)


def test_karcher_zero_inputs_and_base():
    v = randn(5, seed=38)
    close(run("karcher", [v, torch.zeros(5)]), 0.5 * v)  # zero norm: no direction, counts in the scale
    torch.testing.assert_close(run("karcher", [torch.zeros(5), torch.zeros(5)]), torch.zeros(5))
    a, b, c = randn(5, seed=39), randn(5, seed=40), randn(5, seed=41)
    close(run("karcher", [b, c], a), run("karcher", [a, b, c]))
    close(run("karcher", [b, c], a, include_base=False), run("karcher", [b, c]))
