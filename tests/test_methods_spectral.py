"""Spectral methods: TSV-M / TSV-C, Iso-C / Iso-CTS, RESM, Twin shared expert.

Goldens compare against straightforward float64 references written here (following the papers' steps,
with the official code's zero-padded m x r buffers rather than our concatenation), plus identities,
orthogonality properties, the exclusion fallback, SVD back-ends, seeds and bad inputs.
"""
from __future__ import annotations

import pytest
import torch

from mergesmith.api import merge_tensors
from mergesmith.methods import _spectral as sp
from mergesmith.methods.base import MergeError
from mergesmith.methods.resm import outlier_reweight, sparsity_ranks
from mergesmith.methods.tsv import tsv_c_compress, tsv_c_reconstruct, tsv_c_state_dict

W = "model.layers.0.mlp.up_proj.weight"  # a name that is SVD'd by default


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only add overhead (and spin on a busy machine)
    yield
    torch.set_num_threads(old)


def _models(shape=(12, 9), n=3, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _polar64(a):
    U, _, Vh = torch.linalg.svd(a, full_matrices=False)
    return U @ Vh


def ref_tsv(base, models, k=None, alpha=1.0):
    """Official-style TSV-M: per task SVD, top-k written into zero m x r buffers at block i, summed,
    both buffers orthogonalised by SVD, multiplied with the summed S."""
    b = base.double()
    deltas = [m.double() - b for m in models]
    n = len(deltas)
    r = min(b.shape)
    k = int(r / n) if k is None else k
    sum_u = torch.zeros(b.shape[0], r, dtype=torch.float64)
    sum_s = torch.zeros(r, dtype=torch.float64)
    sum_v = torch.zeros(r, b.shape[1], dtype=torch.float64)
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k] = vh[:k]
    merged = _polar64(sum_u) @ torch.diag(sum_s) @ _polar64(sum_v)
    return b + alpha * merged


def ref_iso_c(base, models, alpha=1.0):
    b = base.double()
    u, s, vh = torch.linalg.svd(sum(m.double() - b for m in models), full_matrices=False)
    return b + alpha * s.mean() * (u @ vh)


def ref_iso_cts(base, models, f=0.8, alpha=1.0):
    b = base.double()
    deltas = [m.double() - b for m in models]
    n, r = len(deltas), min(b.shape)
    kc = int(r * f)
    kc = r - round((r - kc) / n) * n
    s_ = (r - kc) // n
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc]
    U = torch.zeros(b.shape[0], r, dtype=torch.float64)
    S = torch.zeros(r, dtype=torch.float64)
    V = torch.zeros(r, b.shape[1], dtype=torch.float64)
    for i, d in enumerate(deltas):  # task-specific blocks first, common last (official layout)
        ui, si, vi = torch.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        U[:, i * s_:(i + 1) * s_], S[i * s_:(i + 1) * s_], V[i * s_:(i + 1) * s_] = ui[:, :s_], si[:s_], vi[:s_]
    U[:, n * s_:], S[n * s_:], V[n * s_:] = uc, sc, vc
    return b + alpha * S.mean() * (_polar64(U) @ _polar64(V))


# ---------------------------------------------------------------------------------------------------
# goldens


@pytest.mark.parametrize("shape", [(12, 9), (7, 15), (10, 10)])
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_m_golden(shape, n):
    base, models = _models(shape, n)
    ref = ref_tsv(base, models, alpha=0.7)
    out64 = merge_tensors("tsv_m", models, base, name=W, alpha=0.7, svd_dtype="float64")
    out32 = merge_tensors("tsv_m", models, base, name=W, alpha=0.7)
    assert torch.allclose(out64.double(), ref, atol=1e-6)
    assert torch.allclose(out32.double(), ref, atol=2e-5)


def test_tsv_m_rank_fraction_golden():
    base, models = _models((16, 12), 3, seed=4)
    out = merge_tensors("tsv_m", models, base, name=W, rank_fraction=0.25, svd_dtype="float64")
    assert torch.allclose(out.double(), ref_tsv(base, models, k=3), atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 9), (6, 14)])
def test_iso_c_golden(shape):
    base, models = _models(shape, 3, seed=1)
    out = merge_tensors("iso_c", models, base, name=W, alpha=1.5, svd_dtype="float64")
    assert torch.allclose(out.double(), ref_iso_c(base, models, 1.5), atol=1e-6)
    assert torch.allclose(merge_tensors("iso_c", models, base, name=W, alpha=1.5).double(),
                          ref_iso_c(base, models, 1.5), atol=2e-5)


@pytest.mark.parametrize("shape,n,f", [((20, 16), 3, 0.8), ((11, 13), 2, 0.5), ((9, 9), 4, 0.7)])
def test_iso_cts_golden(shape, n, f):
    base, models = _models(shape, n, seed=2)
    out = merge_tensors("iso_cts", models, base, name=W, common_space_fraction=f, svd_dtype="float64")
    assert torch.allclose(out.double(), ref_iso_cts(base, models, f), atol=1e-6)


def test_resm_golden_against_documented_rule():
    base, models = _models((14, 10), 3, seed=5)
    models[1] = models[1].clone()
    models[1][:, :5] = base[:, :5]  # half of task 1's entries unchanged: density 0.5
    models[2] = models[2].clone()
    models[2][0, 0] += 5.0  # one outlier in task 2
    b = base.double()
    deltas = [m.double() - b for m in models]
    dens = [float((d != 0).double().mean()) for d in deltas]
    ks = [max(1, int(10 / 3 * di / (sum(dens) / 3))) for di in dens]
    us, ss, vs = [], [], []
    for d, k in zip(deltas, ks):
        cap = 5.0 * d.abs().mean()
        d = torch.where(d.abs() > cap, d.sign() * cap, d)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    ref = b + _polar64(U) @ torch.diag(S) @ _polar64(V.T).T
    out = merge_tensors("resm", models, base, name=W, svd_dtype="float64")
    assert ks == [4, 2, 4]
    assert torch.allclose(out.double(), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# identities and properties


def test_tsv_m_single_model_full_rank_is_identity():
    base, models = _models((10, 7), 1)
    assert torch.allclose(merge_tensors("tsv_m", models, base, name=W), models[0], atol=1e-5)


def test_tsv_m_orthogonal_tasks_equal_sum_of_truncations():
    # tasks living on disjoint row and column blocks: U^ and V^ are already orthonormal, so TSV-M is the
    # sum of each task's rank-k truncation
    base = torch.zeros(12, 12)
    g = torch.Generator().manual_seed(0)
    models = []
    for i in range(3):
        m = base.clone()
        m[4 * i:4 * i + 4, 4 * i:4 * i + 4] = torch.randn(4, 4, generator=g)
        models.append(m)
    out = merge_tensors("tsv_m", models, base, name=W)
    assert torch.allclose(out, sum(models), atol=1e-5)  # k = 12/3 = 4 = each task's full rank


def test_iso_c_single_model_is_its_polar_factor_times_mean_singular_value():
    base, models = _models((9, 6), 1, seed=3)
    d = (models[0] - base).double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    out = merge_tensors("iso_c", models, base, name=W).double() - base.double()
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out, torch.full_like(s_out, float(s.mean())), atol=1e-5)  # flat spectrum
    assert torch.allclose(out, s.mean() * (u @ vh), atol=1e-5)  # same singular vectors


def test_iso_results_have_flat_spectrum():
    base, models = _models((15, 11), 3, seed=6)
    for method in ("iso_c", "iso_cts"):
        s = torch.linalg.svdvals((merge_tensors(method, models, base, name=W) - base).double())
        assert (s.max() - s.min()) / s.max() < 1e-4, method


@pytest.mark.parametrize("shape", [(12, 12), (10, 14), (14, 10)])
def test_iso_cts_gram_golden(shape):  # both task-specific routes (complement basis / projection)
    base, models = _models(shape, 3, seed=17)
    out = merge_tensors("iso_cts", models, base, name=W, svd="gram", svd_dtype="float64")
    assert torch.allclose(out.double(), ref_iso_cts(base, models), atol=1e-6)


def test_iso_cts_with_full_common_space_is_iso_c():
    base, models = _models((10, 8), 3, seed=7)
    a = merge_tensors("iso_cts", models, base, name=W, common_space_fraction=1.0)
    b = merge_tensors("iso_c", models, base, name=W)
    assert torch.allclose(a, b, atol=1e-5)


def test_iso_c_rank_tol_restricts_to_numerical_rank():
    g = torch.Generator().manual_seed(8)
    base = torch.zeros(10, 8)
    models = [base + torch.randn(10, 1, generator=g) @ torch.randn(1, 8, generator=g) for _ in range(2)]
    out = merge_tensors("iso_c", models, base, name=W, rank_tol=1e-4)
    d = sum(models)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    ref = s[:2].mean() * (u[:, :2] @ vh[:2])
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.linalg.matrix_rank(out.double(), atol=1e-5) == 2
    assert torch.linalg.matrix_rank(merge_tensors("iso_c", models, base, name=W).double(), atol=1e-5) == 8


def test_resm_without_reweighting_is_tsv_m():
    base, models = _models((13, 9), 3, seed=9)
    a = merge_tensors("resm", models, base, name=W, outlier_threshold=0, rank_rule="uniform", alpha=0.8)
    b = merge_tensors("tsv_m", models, base, name=W, alpha=0.8)
    assert torch.equal(a, b)


def test_resm_pieces():
    d = torch.tensor([[1.0, -1.0, 1.0, 20.0]])
    assert torch.allclose(outlier_reweight(d, 2.0), torch.tensor([[1.0, -1.0, 1.0, 11.5]]))
    assert torch.equal(outlier_reweight(d, 0), d)
    dense, half = torch.ones(4, 4), torch.ones(4, 4)
    half[:, :2] = 0
    assert sparsity_ranks([dense, half], 12, None, "sparsity") == [8, 4]
    assert sparsity_ranks([dense, half], 12, None, "uniform") == [6, 6]
    assert sparsity_ranks([torch.zeros(2, 2)] * 2, 2, None, "sparsity") == [0, 0]


def test_twin_shared_expert_is_task_arithmetic():
    base, models = _models((5, 4), 3)
    out = merge_tensors("twin_merging", models, base, name=W)
    assert torch.allclose(out, base + 0.29 * sum(m - base for m in models), atol=1e-6)


def test_polar_factor_is_the_nearest_orthonormal_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 5, generator=g, dtype=torch.float64)
    for method in ("svd", "eigh"):
        p = sp.polar(a, method)
        assert torch.allclose(p.T @ p, torch.eye(5, dtype=torch.float64), atol=1e-10)
        for _ in range(5):  # no random orthonormal matrix is closer
            q, _ = torch.linalg.qr(torch.randn(9, 5, generator=g, dtype=torch.float64))
            assert torch.linalg.norm(a - p) <= torch.linalg.norm(a - q) + 1e-12
    assert torch.allclose(sp.polar(a, "svd"), sp.polar(a, "eigh"), atol=1e-10)
    wide = sp.polar(a.T, "eigh")
    assert torch.allclose(wide @ wide.T, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_tsv_output_uses_orthonormal_factors():
    # the merged matrix is U_perp S V_perp^T with orthonormal U_perp, V_perp: its singular values are
    # exactly the concatenated task singular values
    base, models = _models((12, 12), 3, seed=10)
    out = (merge_tensors("tsv_m", models, base, name=W, svd_dtype="float64") - base).double()
    ss = torch.cat([torch.linalg.svdvals((m - base).double())[:4] for m in models]).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(out), ss, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# exclusion and fallbacks


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "resm"])
def test_fallback_is_mean_task_vector(method):
    base, models = _models((16, 8), 3, seed=11)
    mean = base + 1.3 * sum(m - base for m in models) / 3
    for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.allclose(merge_tensors(method, models, base, name=name, alpha=1.3), mean, atol=1e-6), name
    assert torch.allclose(merge_tensors(method, [m[0] for m in models], base[0], name="model.norm.weight",
                                        alpha=1.3), mean[0], atol=1e-6)
    assert torch.allclose(merge_tensors(method, [m[0, 0] for m in models], base[0, 0], name="scalar", alpha=1.3),
                          mean[0, 0], atol=1e-6)
    custom = merge_tensors(method, models, base, name=W, alpha=1.3, spectral_exclude=r"mlp\.up_proj")
    assert torch.allclose(custom, mean, atol=1e-6)
    svd_d = merge_tensors(method, models, base, name="model.embed_tokens.weight", alpha=1.3, spectral_exclude="")
    assert not torch.allclose(svd_d, mean, atol=1e-4)
    both = merge_tensors(method, models, base, name=W, alpha=1.3, spectral_exclude=r"default;up_proj")
    assert torch.allclose(both, mean, atol=1e-6)


def test_exclude_patterns():
    assert sp.is_matrix("model.layers.3.self_attn.q_proj.weight", torch.zeros(4, 4))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "shared.weight", "transformer.wte.weight",
                 "text_projection"):
        assert not sp.is_matrix(name, torch.zeros(4, 4)), name
    assert not sp.is_matrix("model.layers.0.attn.bias", torch.zeros(4))
    assert sp.is_matrix("lm_head.weight", torch.zeros(4, 4), "")
    with pytest.raises(MergeError, match="not a valid regex"):
        merge_tensors("tsv_m", [torch.ones(3, 3)], torch.zeros(3, 3), name=W, spectral_exclude="(")


def test_rank_zero_falls_back_to_mean():
    base, models = _models((2, 10), 3, seed=12)  # r = 2 < N = 3: floor(r/N) = 0
    mean = base + sum(m - base for m in models) / 3
    assert torch.allclose(merge_tensors("tsv_m", models, base, name=W), mean, atol=1e-6)
    out = merge_tensors("iso_cts", models, base, name=W)  # s = 0: Iso-C on the common part
    assert torch.allclose(out, merge_tensors("iso_c", models, base, name=W), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# back-ends, seeds, dtypes, errors


def _lowrank_plus_noise(m, n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(0, -2, rank)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    return (u * s) @ v.T + 1e-5 * torch.randn(m, n, generator=g)


def test_truncated_svd_backends_agree():
    x = _lowrank_plus_noise(80, 60, 12, 0)
    ref = sp.top_svd(x, 5, "exact", dtype=torch.float64)
    for mode in ("gram", "randomized"):
        U, S, Vh = sp.top_svd(x, 5, mode, generator=torch.Generator().manual_seed(1), niter=2)
        assert torch.allclose(S.double(), ref[1], rtol=1e-3), mode
        assert torch.allclose((U * S) @ Vh, ((ref[0] * ref[1]) @ ref[2]).float(), atol=1e-4), mode
    for mode in ("exact", "gram", "randomized"):  # wide orientation
        U, S, Vh = sp.top_svd(x.T, 5, mode, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(S.double(), ref[1], rtol=1e-3), mode
        assert U.shape == (60, 5) and Vh.shape == (5, 80)


def test_gram_svd_of_singular_square_matrix_has_orthonormal_u():
    # Iso-CTS relies on U of a square (or wide) matrix being a full orthonormal basis in gram mode too
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    U, S, Vh = sp.full_svd(x, "gram", torch.float64)
    assert torch.allclose(U.T @ U, torch.eye(10, dtype=torch.float64), atol=1e-10)
    assert torch.allclose((U * S) @ Vh, x, atol=1e-10)


EXACT = {"svd": "exact", "orthogonalize": "svd"}  # LAPACK everywhere (the pre-0.2 defaults)


def _exact(method):
    return {k: v for k, v in EXACT.items() if not (method == "iso_c" and k == "orthogonalize")}


@pytest.mark.parametrize("method,opts", [("tsv_m", {"svd": "gram"}), ("tsv_m", {"orthogonalize": "eigh"}),
                                         ("tsv_m", {"svd": "randomized", "svd_niter": 4}),
                                         ("iso_c", {"svd": "gram"}), ("iso_cts", {"orthogonalize": "eigh"}),
                                         ("iso_cts", {"svd": "randomized"}), ("iso_cts", {"svd": "gram"}),
                                         ("resm", {"svd": "gram"})])
def test_speed_options_match_exact(method, opts):
    g = torch.Generator().manual_seed(13)
    base = torch.randn(64, 48, generator=g)
    models = [base + _lowrank_plus_noise(64, 48, 40, 20 + i) for i in range(3)]
    exact = merge_tensors(method, models, base, name=W, **_exact(method))
    fast = merge_tensors(method, models, base, name=W, **{**_exact(method), **opts})
    # the guarded Gram/eigh routes agree to float32 accuracy; the randomized range finder is approximate
    # (here: a decaying spectrum, 2-4 power iterations)
    tol = 5e-3 if opts.get("svd") == "randomized" else 1e-5
    rel = float((fast - exact).norm() / (exact - base).norm())
    assert rel < tol, (method, opts, rel)


def _route_counter(monkeypatch):
    """Count which route the guarded decompositions take: {'gram': n, 'gram_fallback': n, 'eigh': n, ...}."""
    from collections import Counter

    seen = Counter()
    g, pe = sp._gram_svd, sp._polar_eigh

    def gram(*a, **k):
        out = g(*a, **k)
        seen["gram" if out is not None else "gram_fallback"] += 1
        return out

    def polar(*a, **k):
        out = pe(*a, **k)
        seen["eigh" if out is not None else "eigh_fallback"] += 1
        return out

    monkeypatch.setattr(sp, "_gram_svd", gram)
    monkeypatch.setattr(sp, "_polar_eigh", polar)
    return seen


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "resm"])
@pytest.mark.parametrize("shape", [(160, 48), (48, 160), (64, 64)])
def test_defaults_match_lapack_on_fine_tune_like_deltas(monkeypatch, method, shape):
    """The defaults (guarded Gram/eigh) against LAPACK SVD/polar on full-rank noise deltas: tall/wide
    matrices take the fast routes, the square ones partly fall back (ill-conditioned concatenations)."""
    g = torch.Generator().manual_seed(31)
    base = 0.02 * torch.randn(shape, generator=g)
    models = [base + 2e-3 * torch.randn(shape, generator=g) for _ in range(3)]
    seen = _route_counter(monkeypatch)
    fast = merge_tensors(method, models, base, name=W)
    if shape[0] != shape[1]:  # square noise matrices are ill-conditioned (kappa ~ n): Iso-C falls back there
        assert seen["gram"] + seen["eigh"] > 0, seen  # some fast route was taken
    exact = merge_tensors(method, models, base, name=W, **_exact(method))
    ref = merge_tensors(method, [m.double() for m in models], base.double(), name=W, svd_dtype="float64",
                        **_exact(method)).double()
    err_fast = float((fast.double() - ref).abs().max())
    err_exact = float((exact.double() - ref).abs().max())
    scale = float((ref - base.double()).abs().max())
    assert err_fast <= max(3 * err_exact, 1e-6 * scale), (method, shape, err_fast, err_exact, dict(seen))


def test_gram_guard_falls_back_on_decaying_spectra(monkeypatch):
    # s_k / s_1 = 1e-3 < 1 / GUARD_KAPPA: the float32 Gram cannot resolve the k-th triplet -> LAPACK, bit for bit
    x = _lowrank_plus_noise(80, 60, 30, 3)  # singular values 1 .. 1e-2 (30 of them), then 1e-5 noise
    assert sp._gram_svd(x, 25) is None
    for a, b in zip(sp.top_svd(x, 25, "gram"), sp.top_svd(x, 25, "exact")):
        assert torch.equal(a, b)
    out = sp._gram_svd(x, 5)  # s_5 / s_1 ~ 0.5: accepted, and equal to LAPACK's to float32 accuracy
    assert out is not None
    ref = sp.top_svd(x, 5, "exact", dtype=torch.float64)
    assert torch.allclose((out[0] * out[1]) @ out[2], ((ref[0] * ref[1]) @ ref[2]).float(), atol=1e-6)
    # full decomposition (Iso-C): rank-deficient -> the Cholesky pre-check rejects it before the eigh
    calls = []
    monkeypatch.setattr(sp.torch.linalg, "eigh", lambda *a: (calls.append(1), torch.linalg.eigvalsh)[1] and None)
    assert sp._gram_svd(x, 60, precheck=True) is None and calls == []


def test_polar_guard(monkeypatch):
    g = torch.Generator().manual_seed(4)
    well = torch.linalg.qr(torch.randn(50, 20, generator=g))[0] + 0.05 * torch.randn(50, 20, generator=g)
    seen = _route_counter(monkeypatch)
    p_eigh, p_svd = sp.polar(well, "eigh"), sp.polar(well, "svd")
    assert seen["eigh"] == 1 and torch.allclose(p_eigh, p_svd, atol=1e-6)
    assert torch.allclose(sp.polar(well.T), p_svd.T, atol=1e-6)  # wide: rows orthonormal
    # kappa 1000 > GUARD_KAPPA: the squared condition number would cost accuracy -> the SVD polar factor
    u, _, vh = torch.linalg.svd(torch.randn(50, 20, generator=g), full_matrices=False)
    ill = (u * torch.logspace(0, -3, 20)) @ vh
    assert torch.equal(sp.polar(ill, "eigh"), sp.polar(ill, "svd")) and seen["eigh_fallback"] == 1
    # rank-deficient: completed by the SVD as in the paper (not a partial isometry)
    low = torch.randn(50, 3, generator=g) @ torch.randn(3, 20, generator=g)
    q = sp.polar(low)
    assert torch.allclose(q.T @ q, torch.eye(20), atol=1e-5)


def test_defaults_are_the_guarded_fast_routes():
    from mergesmith.methods.base import get_method

    for m in ("tsv_m", "iso_cts", "resm"):
        defaults = {p.name: p.default for p in get_method(m).params}
        assert defaults["svd"] == "gram" and defaults["orthogonalize"] == "eigh", m
        assert "svd" not in get_method(m).example  # benchmarks/speed.py runs what users get
    assert {p.name: p.default for p in get_method("iso_c").params}["svd"] == "gram"


def test_randomized_is_reproducible_per_seed():
    g = torch.Generator().manual_seed(14)
    base = torch.randn(80, 70, generator=g)
    models = [base + torch.randn(80, 70, generator=g) for _ in range(3)]
    kw = dict(svd="randomized", rank_fraction=0.1, svd_niter=0)
    a = merge_tensors("tsv_m", models, base, name=W, seed=5, **kw)
    b = merge_tensors("tsv_m", models, base, name=W, seed=5, **kw)
    c = merge_tensors("tsv_m", models, base, name=W, seed=6, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a different test matrix (no power iterations on a flat spectrum)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "resm"])
def test_bf16_in_bf16_out(method):
    base, models = _models((16, 12), 3, seed=15)
    base, models = base.bfloat16(), [m.bfloat16() for m in models]
    ref = merge_tensors(method, [m.float() for m in models], base.float(), name=W)  # float32 arithmetic
    out = merge_tensors(method, models, base, name=W)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_bad_parameters():
    base, models = _models((6, 6), 2)
    with pytest.raises(MergeError, match="rank_fraction"):
        merge_tensors("tsv_m", models, base, name=W, rank_fraction=0)
    with pytest.raises(MergeError, match="common_space_fraction"):
        merge_tensors("iso_cts", models, base, name=W, common_space_fraction=1.5)
    with pytest.raises(MergeError, match="rank_tol"):
        merge_tensors("iso_c", models, base, name=W, rank_tol=2)
    with pytest.raises(MergeError, match="not one of"):
        merge_tensors("tsv_m", models, base, name=W, svd="qr")
    with pytest.raises(MergeError, match="not one of"):
        merge_tensors("iso_c", models, base, name=W, svd="randomized")
    with pytest.raises(MergeError, match="needs a base"):
        merge_tensors("iso_c", models, None, name=W)


# ---------------------------------------------------------------------------------------------------
# TSV-C


def test_tsv_c_compress_is_eckart_young():
    x = _lowrank_plus_noise(40, 30, 30, 3)
    lr = tsv_c_compress(x, 0.1)
    assert lr.rank == 3 and lr.shape == (40, 30)
    s = torch.linalg.svdvals(x.double())
    err = torch.linalg.norm(x.double() - lr.dense().double())
    assert torch.isclose(err, s[3:].norm(), rtol=1e-4)
    assert tsv_c_compress(torch.randn(3, 4), 0.1).rank == 1  # at least one triplet


def test_tsv_c_state_dict_round_trip():
    g = torch.Generator().manual_seed(16)
    base = {"model.layers.0.w.weight": torch.randn(8, 6, generator=g), "model.norm.weight": torch.randn(6, generator=g),
            "model.embed_tokens.weight": torch.randn(10, 6, generator=g), "step": torch.tensor(3)}
    ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
    comp = tsv_c_state_dict(base, ft, rank_fraction=1.0)
    assert isinstance(comp["model.layers.0.w.weight"], sp.LowRank)
    assert isinstance(comp["model.embed_tokens.weight"], torch.Tensor)  # excluded: stored dense
    assert "step" not in comp
    rec = tsv_c_reconstruct(base, comp)
    for k in base:
        assert torch.allclose(rec[k].float(), ft[k].float(), atol=1e-5), k
    small = tsv_c_state_dict(base, ft, rank_fraction=0.2)
    assert small["model.layers.0.w.weight"].rank == 1


# ---------------------------------------------------------------------------------------------------
# streaming: row chunks for the fallback tensors; concurrent per-task decompositions


def test_fallback_chunkable_follows_the_exclusion_list():
    from mergesmith.methods.base import get_method

    p = {"spectral_exclude": "default"}
    for m in ("tsv_m", "iso_c", "iso_cts", "resm"):
        spec = get_method(m)
        assert spec.can_chunk(p, "model.embed_tokens.weight", (32000, 2048)), m
        assert spec.can_chunk(p, "lm_head.weight", (32000, 2048)), m
        assert spec.can_chunk(p, "conv.weight", (64, 3, 3, 3)), m  # not 2-D: element-wise fallback
        assert not spec.can_chunk(p, W, (5632, 2048)), m
        assert not spec.can_chunk({"spectral_exclude": ""}, "lm_head.weight", (32000, 2048)), m
        assert spec.can_chunk({"spectral_exclude": r"up_proj"}, W, (5632, 2048)), m
    assert sp.is_matrix_shape(W, (3, 4)) and not sp.is_matrix_shape(W, (0, 4)) and not sp.is_matrix_shape(W, (4,))


@pytest.mark.parametrize("method,params", [
    ("tsv_m", {}), ("tsv_m", {"svd": "gram", "orthogonalize": "eigh"}), ("iso_c", {}), ("iso_cts", {}),
    ("resm", {}), ("twin_merging", {}),
])
def test_chunked_fallback_equals_whole_tensor(tiny_zoo, method, params):
    from mergesmith.engine import DictSink, execute
    from mergesmith.run import plan_recipe

    z = tiny_zoo("llama")
    plan = plan_recipe({"merge_method": method, "base_model": str(z["base"]), "parameters": params,
                        "models": [{"model": str(z[f"ft{i}"])} for i in range(3)]})
    assert any(plan.method.can_chunk(j.params, j.out_name, tuple(j.shape)) and len(j.shape) == 2
               for j in plan.jobs if j.method is not None)  # the embeddings / lm_head are chunked
    whole, chunked = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    execute(plan, chunked, chunk_elements=100)
    for k in whole.tensors:
        assert torch.equal(whole.tensors[k], chunked.tensors[k]), k


def test_opcm_chunked_embeddings_agree(tiny_zoo):
    from mergesmith.engine import DictSink, execute
    from mergesmith.run import plan_recipe

    z = tiny_zoo("llama")
    plan = plan_recipe({"merge_method": "opcm", "base_model": str(z["base"]),
                        "models": [{"model": str(z[f"ft{i}"])} for i in range(3)]})
    assert plan.method.can_chunk({}, "model.embed_tokens.weight", (64, 32))
    assert not plan.method.can_chunk({}, "lm_head.weight", (64, 32))  # projected by OPCM
    whole, chunked = DictSink(plan), DictSink(plan)
    execute(plan, whole)
    execute(plan, chunked, chunk_elements=100)
    for k in whole.tensors:  # only the float64 summation order of the whole-model norms may differ
        assert torch.allclose(whole.tensors[k], chunked.tensors[k], rtol=1e-6, atol=0), k


@pytest.mark.parametrize("method,opts", [
    ("tsv_m", {}), ("tsv_m", {"svd": "gram", "orthogonalize": "eigh"}),
    ("tsv_m", {"svd": "randomized", "rank_fraction": 0.1}), ("iso_cts", {}),
    ("iso_cts", {"svd": "gram", "orthogonalize": "eigh"}), ("resm", {}),
])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_results_do_not_depend_on_the_number_of_workers(monkeypatch, method, opts, shape):
    base, models = _models(shape, 3, seed=21)
    monkeypatch.setattr(sp, "PARALLEL", True)
    outs = []
    for w in (1, 2, 3):
        monkeypatch.setattr(sp, "WORKERS", w)
        outs.append(merge_tensors(method, models, base, name=W, **opts))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    monkeypatch.setattr(sp, "PARALLEL", False)  # the plain loop: same maths, other rounding at most
    assert torch.allclose(merge_tensors(method, models, base, name=W, **opts), outs[0], atol=1e-5)


def test_parallel_map_restores_the_thread_count(monkeypatch):
    monkeypatch.setattr(sp, "PARALLEL", True)
    torch.set_num_threads(2)
    seen = sp.parallel_map(lambda _: torch.get_num_threads(), range(4))
    assert seen == [1] * 4 and torch.get_num_threads() == 2

    def boom(i):
        if i == 2:
            raise ValueError("x")
        return i

    with pytest.raises(ValueError):
        sp.parallel_map(boom, range(4))
    assert torch.get_num_threads() == 2
    assert sp.parallel_map(lambda i: i * i, range(5)) == [0, 1, 4, 9, 16]  # order kept
    assert sp.parallel_map(lambda _: torch.get_num_threads(), range(2), enabled=False) == [2, 2]
    monkeypatch.setattr(sp, "PARALLEL", False)  # the default: the plain loop with the caller's threads
    assert sp.parallel_map(lambda _: torch.get_num_threads(), range(2)) == [2, 2]


def test_iso_cts_common_block_is_kept_in_the_polar_factor():
    # polar([U_c | W]) = [U_c | polar(W)] when U_c is orthonormal and orthogonal to W (Iso-CTS's task blocks)
    g = torch.Generator().manual_seed(40)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    uc, comp = q[:, :20], q[:, 20:]
    w = comp @ torch.randn(10, 9, generator=g, dtype=torch.float64)
    s = [torch.rand(20, generator=g, dtype=torch.float64), torch.rand(9, generator=g, dtype=torch.float64)]
    vh = [torch.randn(20, 25, generator=g, dtype=torch.float64), torch.randn(9, 25, generator=g, dtype=torch.float64)]
    full = sp.orthogonal_merge([uc, w], list(s), list(vh), "svd", isotropic=True)
    fast = sp.orthogonal_merge([uc, w], list(s), list(vh), "svd", isotropic=True, u_orthonormal_head=True)
    assert torch.allclose(full, fast, atol=1e-12)


def test_lapack_svd_retries_in_float64(monkeypatch):
    real = torch.linalg.svd

    def flaky(a, full_matrices=True):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices)

    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(2))
    want = real(x, full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    U, S, Vh = sp.svd(x)
    assert U.dtype == torch.float32 and torch.allclose((U * S) @ Vh, x, atol=1e-5)
    assert torch.allclose(S, want[1], atol=1e-5)
