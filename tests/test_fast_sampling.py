"""Fast DARE / DELLA kernels: exact MagPrune ranks, the seeded SplitMix64 stream, fused drop-and-rescale."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergesmith.methods import _sampling as S
from mergesmith.methods import kernels as K
from mergesmith.methods.base import TensorContext
from mergesmith.methods.della import _magprune_fused_, magprune_probs


def ref_magprune_probs(t: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    """The previous implementation (per-row stable argsort + scatter), kept as the reference."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)
    n = rows.shape[-1]
    if n <= 1:
        rho = torch.ones_like(rows)
    else:
        order = torch.argsort(K.float_bits(rows.abs()), dim=-1, stable=True)
        ranks = torch.arange(n, dtype=torch.float32, device=t.device).expand_as(rows)
        rho = torch.empty_like(rows).scatter_(-1, order, ranks).div_(n - 1)
    return ((d - eps) + (2 * eps) * rho).reshape(t.shape)


def _tie_heavy(shape, g):
    """Values with many exact ties (small integers), zeros, -0.0, and a few inf/nan/subnormals."""
    x = torch.randint(-6, 7, shape, generator=g).float() * 0.25
    flat = x.view(-1)
    if flat.numel() >= 8:
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)] = -0.0
        flat[1] = float("inf")
        flat[2] = float("-inf")
        flat[3] = float("nan")
        flat[4] = 1e-40
        flat[5] = -1e-40
    return x


def _bits(x: torch.Tensor) -> bytes:
    return x.contiguous().numpy().tobytes()


@pytest.mark.parametrize("shape", [(), (1,), (2,), (7,), (1, 1), (5, 1), (3, 2), (4, 3), (9, 17), (2, 3, 5),
                                   (40, 2048), (13, 5632), (3, 40000), (70001,)])
def test_magprune_probs_bit_identical_to_reference(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    def born(dt):  # a delta of two low-precision tensors: shared trailing zero bits (32-bit sort keys)
        base = torch.randn(shape, generator=g) * 0.02
        return (base + torch.randn(shape, generator=g) * 0.002).to(dt).float() - base.to(dt).float()

    for x in (torch.randn(shape, generator=g) * 0.01, _tie_heavy(shape, g), born(torch.bfloat16), born(torch.float16),
              torch.zeros(shape), -torch.zeros(shape), torch.full(shape, 3.0), torch.randn(shape, generator=g) * 1e-39):
        for d, eps in ((0.7, 0.07), (0.5, 0.2), (0.3, 0.29)):
            assert _bits(magprune_probs(x, d, eps)) == _bits(ref_magprune_probs(x, d, eps)), (shape, d, eps)


def test_magprune_probs_noncontiguous_and_threads():
    g = torch.Generator().manual_seed(3)
    x = _tie_heavy((300, 257), g).t()  # non-contiguous rows
    ref = ref_magprune_probs(x, 0.6, 0.1)
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _bits(magprune_probs(x, 0.6, 0.1)) == _bits(ref)
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Both forms of the draw-and-rescale kernels: numba's (loaded first: these tensors are small) and numpy's."""
    from mergesmith.methods import _fused

    if request.param == "numpy":
        monkeypatch.setenv("MERGESMITH_FUSED", "0")
    elif not _fused.enabled():
        pytest.skip("numba not installed")
    return request.param


def test_magprune_fused_equals_unfused_formula(kernels):
    g = torch.Generator().manual_seed(4)
    for shape in [(37, 1000), (5, 2), (3, 5632)]:
        t = _tie_heavy(shape, g) * 0.01 + torch.randn(shape, generator=g) * 1e-3 * (torch.rand(shape, generator=g) < 0.5)
        q = ref_magprune_probs(t, 0.7, 0.07)
        mask = K.bernoulli_mask(shape, q, 12345)
        want = K.rescale(t, t * mask, "inverse_keep_prob", keep_prob=q)
        got = _magprune_fused_(t.clone(), 0.7, 0.07, 12345)
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert _bits(got[ok]) == _bits(want[ok])


def test_drop_rescale_equals_mask_formula(kernels):
    g = torch.Generator().manual_seed(5)
    t = torch.randn(1000, 333, generator=g)
    for d in (0.5, 0.1, 0.9, 1 - 2 ** -26, 1e-9):
        mask = K.bernoulli_mask(t.shape, d, 777)
        want = t * mask / d
        assert _bits(S.drop_rescale_(t.clone(), d, 777)) == _bits(want), d


def _splitmix64(seed: int, count: int) -> list[int]:
    """Straight SplitMix64 on Python ints (Steele et al. 2014; Vigna's splitmix64.c): state += gamma, mix."""
    m64 = (1 << 64) - 1
    x, out = seed & m64, []
    for _ in range(count):
        x = (x + 0x9E3779B97F4A7C15) & m64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_reference_matches_the_published_outputs():
    # the first outputs of splitmix64.c seeded with 1234567 (the usual test vector)
    assert _splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                        4593380528125082431, 16408922859458223821]


def test_stream_blocks_are_slices_of_one_stream():
    full = S.words(99, 0, 5001)
    for a, c in [(0, 1), (1, 1), (1, 2), (2, 7), (3, 1000), (4000, 1001), (5000, 1)]:
        assert np.array_equal(S.words(99, a, c), full[a: a + c]), (a, c)
    # the word layout: raw 64-bit output j = w_2j (low) | w_2j+1 (high)
    for seed in (99, 0, 2 ** 63 - 1, -5):
        raw = _splitmix64(seed, 4)
        assert [int(v) for v in S.words(seed, 0, 8)] == [r >> s & 0xFFFFFFFF for r in raw for s in (0, 32)], seed
        assert [int(v) for v in S.raw_np(seed, 1, 3)] == raw[1:], seed
    u = S.uniform_np(99, 0, 5001)
    assert np.array_equal(u, (full >> 8).astype(np.float64) / 2 ** 24) and u.dtype == np.float32


def test_torch_words_are_the_stream(monkeypatch):
    """The torch form of the stream (drawn on a GPU where the merge runs) gives the CPU words bit for bit,
    at odd and even starts, for seeds over 2^63 and negative ones; the device mask equals the CPU mask for a
    scalar and a per-element keep probability, also across its chunks."""
    for seed in (99, 0, 2 ** 63 + 12345, -5):
        for a, c in [(0, 1), (1, 1), (1, 2), (3, 1000), (4000, 1001)]:
            got = S.words_torch(seed, a, c, "cpu")
            assert got.dtype == torch.int64 and np.array_equal(got.numpy(), S.words(seed, a, c).astype(np.int64)), (seed, a, c)
    monkeypatch.setattr(S, "DEVICE_CHUNK", 777)  # several chunks, cut at odd elements
    g = torch.Generator().manual_seed(0)
    p = torch.rand(40, 50, generator=g)
    for keep in (0.3, p):
        want = S.bernoulli_mask((40, 50), keep, 7)
        assert torch.equal(S._device_mask((40, 50), keep, 7, torch.device("cpu")), want)


def test_word_threshold_is_exact():
    for p in (0.0, 1e-9, 2 ** -24, 0.1, 1 / 3, 0.5, 0.7, 0.9999999, 1 - 2 ** -24, 1 - 2 ** -30, 1.0, 1.5, -0.2):
        thr = S.word_threshold(p)
        for c in {thr - 257, thr - 256, thr - 1, thr, thr + 255, thr + 256, 0, 255, 2 ** 32 - 1}:
            if 0 <= c < 2 ** 32:
                assert ((c >> 8) * 2.0 ** -24 < p) == (c < thr), (p, c)


def test_mask_deterministic_across_threads_and_seeds():
    shape = (321, 999)
    q = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append((K.bernoulli_mask(shape, 0.3, 42), K.bernoulli_mask(shape, q, 42)))
    finally:
        torch.set_num_threads(old)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])
    assert not torch.equal(K.bernoulli_mask(shape, 0.3, 43), outs[0][0])
    # a scalar p and a constant (or broadcast) tensor p give the same mask (same draws)
    assert torch.equal(K.bernoulli_mask(shape, torch.full(shape, 0.3), 42), outs[0][0])
    assert torch.equal(K.bernoulli_mask(shape, torch.full((1, shape[1]), 0.3, dtype=torch.float64), 42), outs[0][0])
    ctx = TensorContext(name="layers.0.w", seed=5, chunk=2)
    assert torch.equal(K.bernoulli_mask((10, 10), 0.5, ctx.seed_of(1)),
                       K.bernoulli_mask((10, 10), 0.5, TensorContext(name="layers.0.w", seed=5, chunk=2).seed_of(1)))
    assert ctx.seed_of(1) != ctx.seed_of(0) and ctx.seed_of(1) < 2 ** 63


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_statistics(p):
    """Keep fraction, its spread over blocks, and independence between models, chunks and neighbours."""
    n = 1 << 20
    ctxs = [TensorContext(name="model.layers.3.mlp.up_proj.weight", seed=0, chunk=c) for c in (0, 1)]
    masks = [K.bernoulli_mask((n,), p, c.seed_of(i)).double() for c in ctxs for i in (0, 1)]
    sd = math.sqrt(p * (1 - p) / n)
    for m in masks:
        assert abs(m.mean().item() - p) < 5 * sd
        blocks = m.reshape(1024, -1).mean(1)  # 1024 blocks of 1024: var = p(1-p)/1024
        ratio = blocks.var().item() / (p * (1 - p) / 1024)
        assert 0.85 < ratio < 1.15, ratio
        x = m - m.mean()
        lag1 = (x[1:] * x[:-1]).mean().item() / x.var().item()
        assert abs(lag1) < 5 / math.sqrt(n)
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            r = torch.corrcoef(torch.stack([masks[a], masks[b]]))[0, 1].item()
            assert abs(r) < 5 / math.sqrt(n), (a, b, r)


def test_uniform_moments_and_histogram():
    n = 1 << 20
    u = torch.from_numpy(S.uniform_np(2024, 0, n)).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)  # chi-square with 63 dof, ~6 sigma


def test_della_keep_rate_per_rank_with_fused_path():
    g = torch.Generator().manual_seed(6)
    rows, n = 2000, 100
    t = (torch.stack([torch.randperm(n, generator=g) for _ in range(rows)]).float() + 1) * 0.01
    d, eps = 0.5, 0.3
    out = _magprune_fused_(t.clone(), d, eps, 9)
    kept = (out != 0).double()
    q = ref_magprune_probs(t, d, eps)
    rank = (t * 100).round().long() - 1
    for r in (0, 25, 50, 99):
        sel = rank == r
        qr = q[sel][0].item()
        assert abs(kept[sel].mean().item() - qr) < 5 * math.sqrt(qr * (1 - qr) / rows)
    assert torch.allclose(out[out != 0] * q[out != 0], t[out != 0], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# MagPrune ranks from 32-bit keys (_rank.row_order): the exact stable order of the 64-bit keys


def ref_order(x: np.ndarray) -> np.ndarray:
    """In-row positions in stable ascending order of |x| (IEEE bit order: -0 == +0, NaN above inf)."""
    return np.argsort(x.view(np.int32) & 0x7FFFFFFF, axis=-1, kind="stable")


def _bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).float().numpy()


def _bf16_delta(rows, n, rng, scale=0.002):
    """A bf16 fine-tune minus its bf16 base, in float32: few significant bits, many exact ties."""
    base = rng.standard_normal((rows, n)) * 0.02
    return _bf16(base + rng.standard_normal((rows, n)) * scale) - _bf16(base)


def _order_cases(rows, n, rng):
    d = _bf16_delta(rows, n, rng)
    special = d.copy()
    f = special.reshape(-1)
    bits = np.array([0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7FFFFFFF, 1, 0x80000001,
                     0x00400000, 0x7F7FFFFF, 0x80000000, 0x00000000], dtype=np.uint32).view(np.float32)
    f[rng.integers(0, f.size, bits.size)] = bits  # -0, +-inf, NaNs (payloads, signs), subnormals, max, +0
    mixed = d.copy()
    sel = rng.random(mixed.shape) < 0.01
    mixed[sel] = (rng.standard_normal(int(sel.sum())) * 0.002).astype(np.float32)
    near = d.copy()
    near.view(np.uint32)[...] ^= (rng.random(near.shape) < 0.3).astype(np.uint32)  # last-bit neighbours
    zero_rows = d.copy()
    zero_rows[::3] = 0.0  # rows a fine-tune left unchanged between changed ones (their sort is skipped)
    zero_rows[1::5] = -0.0
    zero_rows[2::7, -1] = np.inf  # and rows that need the 64-bit keys
    return {
        "zero-rows": zero_rows,
        "bf16": d,
        "bf16-wide": _bf16_delta(rows, n, rng, scale=0.02),
        "f32": (rng.standard_normal((rows, n)) * 0.002).astype(np.float32),
        "special": special,
        "subnormal": (rng.standard_normal((rows, n)) * 1e-39).astype(np.float32),
        "mixed": mixed,
        "near": near,
        "ties": (rng.integers(-6, 7, (rows, n)) * 0.25).astype(np.float32),
        "zeros": np.zeros((rows, n), np.float32),
        "neg-zeros": -np.zeros((rows, n), np.float32),
    }


def _key_path(codes: str, monkeypatch) -> None:
    """Force _rank.row_keys's codes from the numba pass ("fused") or from numpy ufuncs ("numpy")."""
    from mergesmith.methods import _fused

    if codes == "fused":
        if not _fused.enabled():
            pytest.skip("numba not installed")
        monkeypatch.setattr(_fused, "MIN_ELEMENTS", 0)
    else:
        monkeypatch.setenv("MERGESMITH_FUSED", "0")


@pytest.mark.parametrize("codes", ["fused", "numpy"])
@pytest.mark.parametrize("n", [2, 3, 17, 2048, 5632])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_order32_equals_int64_keys(n, rows, codes, monkeypatch):
    from mergesmith.methods import _rank as R
    from mergesmith.methods import della as D

    _key_path(codes, monkeypatch)
    if n * rows > 1_000_000:
        pytest.skip("large")
    rng = np.random.default_rng(n * 1000 + rows)
    b = max(1, (n - 1).bit_length())
    for name, x in _order_cases(rows, n, rng).items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        want = ref_order(x)
        assert np.array_equal(R.order64(x.view(np.int32), b), want), name  # the previous keys
        assert np.array_equal(R.row_order(x), want), (name, n, rows)
        vals = (np.arange(n, dtype=np.float32) + 0.5) / n
        out = np.full((rows, n), np.nan, np.float32)
        np.put_along_axis(out, want, np.broadcast_to(vals, (rows, n)), axis=-1)
        assert _bits(torch.from_numpy(D._by_rank(x, vals))) == _bits(torch.from_numpy(out)), name


@pytest.mark.parametrize("codes", ["fused", "numpy"])
def test_order32_paths(monkeypatch, codes):
    """The 32-bit sort alone for bf16-born rows, the 64-bit one for float32 blocks, and for rows where two
    rounded magnitudes share a code."""
    from mergesmith.methods import _rank as R

    _key_path(codes, monkeypatch)
    calls = []
    real = R.order64
    monkeypatch.setattr(R, "order64", lambda xi, b: calls.append(xi.shape[0]) or real(xi, b))
    rng = np.random.default_rng(7)
    for n in (2048, 5632):
        rows = max(1, S.BLOCK // n)
        x = _bf16_delta(rows, n, rng)
        calls.clear()
        assert np.array_equal(R.row_order(x), ref_order(x)) and calls == []
        x = (rng.standard_normal((rows, n)) * 0.002).astype(np.float32)
        calls.clear()
        assert np.array_equal(R.row_order(x), ref_order(x)) and calls == [rows]
        # row 3: two magnitudes between the same multiples of 2^k (next to its largest), the larger one first
        x = _bf16_delta(rows, n, rng)
        u = x.view(np.uint32)
        top = u[3, np.argmax(np.abs(x[3]))] & 0x7FFF0000
        p1, p2 = (11, 22) if np.argmax(np.abs(x[3])) not in (11, 22) else (33, 44)
        u[3, p1], u[3, p2] = top | 2, top | 1
        calls.clear()
        got = R.row_order(x)
        assert np.array_equal(got, ref_order(x)) and calls == [1]
        assert list(got[3]).index(p2) < list(got[3]).index(p1)


def test_kernel_words_are_the_numpy_stream():
    """The fused kernels generate the stream themselves (inside their loops too): the words must be the numpy
    form's, from any start, odd or even, for any seed."""
    from mergesmith.methods import _fused

    if not _fused.enabled():
        pytest.skip("numba not installed")
    for seed in (0, 1, 12345, 2 ** 62 + 7, 2 ** 63 - 1, 2 ** 64 - 1):
        for start, count in ((0, 1), (0, 10), (1, 9), (2, 1), (5, 1000), (131072 * 7 + 3, 131072), (2 ** 40 + 1, 17)):
            odd = start & 1
            want = S.raw_np(seed, start >> 1, (odd + count + 1) >> 1).view("<u4")[odd: odd + count]
            assert np.array_equal(_fused.words(seed, start, count), want), (seed, start, count)


@pytest.mark.parametrize("drop", [None, (0.5, 77), (1.0, 5)])
def test_fused_sample_histogram_equals_the_unfused_steps(drop):
    """The sample pass's one-kernel histogram (widen, subtract, DARE's draw, high bucket of |tau|; split over
    the kernel threads) counts exactly what sub -> drop -> abs_high_hist counts."""
    from mergesmith.methods import _fused

    if not _fused.enabled():
        pytest.skip("numba not installed")
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(300_007, generator=g) * 0.02).to(torch.bfloat16)
    m = (base.float() + torch.randn(300_007, generator=g) * 0.003).to(torch.bfloat16)
    m[:50] = base[:50]  # zeros in tau
    t = m.float() - base.float()
    if drop is not None:
        S.DropBlock(*drop)(t, 0)
    want_idx, want_cnt = _fused.abs_high_hist(t)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            idx, cnt = _fused.high_hist_bf16(m, base, drop)
            assert torch.equal(idx, want_idx) and torch.equal(cnt, want_cnt), threads
    finally:
        torch.set_num_threads(old)
