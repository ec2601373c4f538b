"""The numba kernels of ``_fused`` (imported on first use only: importing numba costs ~0.5 s).

Module-level functions so numba's on-disk cache (``cache=True``) finds them again in the next process
(closures get a new cache key every time and were recompiled on every run).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

SUB = 1024  # elements per sub-block inside a kernel (a few KB per model: L1-resident)
opts = dict(nogil=True, cache=True, boundscheck=False, fastmath=False, error_model="numpy")


@njit(**opts)
def widen_bf16(src, out):
    """out = float32 of the bf16 bit patterns ``src`` (int16): exact."""
    ou = out.view(np.uint32)
    for j in range(src.size):
        ou[j] = (np.uint32(src[j]) & np.uint32(0xFFFF)) << np.uint32(16)


@njit(**opts)
def window_sub(bits, lo32, uw, D, out, n):
    """One sub-block of :func:`window`: ``bits`` the float32 bit patterns (int32) of tau. Counts in
    vectorised loops, then the (few, ~2 %) keys inside compacted into out[n:]. Returns (below, n)."""
    below = 0
    ins = 0
    for j in range(bits.size):
        d = (bits[j] & np.int32(0x7FFFFFFF)) - lo32
        D[j] = d
        below += 1 if d < 0 else 0
        ins += 1 if np.uint32(d) < uw else 0
    if ins:
        for j in range(bits.size):
            if np.uint32(D[j]) < uw:
                out[n] = D[j]
                n += 1
    return below, n


@njit(**opts)
def tau_trim(x, B, Ti, W, seed, start, thr, d, drop, kind, lb):
    """Ti[:x.size] = trim(tau), tau = float32(x) - B for the bf16 bits ``x`` (DARE's tau * [w < thr] / d first
    if ``drop``, words of stream ``seed`` from element ``start``), trim as :func:`trim_into` (kind 0 keep, 1
    hardshrink at lb, 2 zero): the widening, the subtraction, the draw and :func:`trim_into` in one loop."""
    m = x.size
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if kind == 2:
        for j in range(m):
            Ti[j] = zero
        return
    if drop:
        stream_words(W[:m], seed, start)
        if kind == 1:
            for j in range(m):
                t = ((f32_at(x, j) - B[j]) * (one if np.uint64(W[j]) < thr else zero)) / d
                Ti[j] = zero if (t >= -lb and t <= lb) else t
        else:
            for j in range(m):
                Ti[j] = ((f32_at(x, j) - B[j]) * (one if np.uint64(W[j]) < thr else zero)) / d
    elif kind == 1:
        for j in range(m):
            t = f32_at(x, j) - B[j]
            Ti[j] = zero if (t >= -lb and t <= lb) else t
    else:
        for j in range(m):
            Ti[j] = f32_at(x, j) - B[j]


@njit(**opts)
def window_bf16(src, base, seed, start, thr, d, drop, lo, width, out):
    """``window`` of tau = float32(src) - base (DARE-dropped if ``drop``: stream ``seed``, first element
    ``start``), ``src`` the stored bf16 bits (int16): tau not kept."""
    U = np.empty(SUB, np.uint32)
    UF = U.view(np.float32)
    UI = U.view(np.int32)
    W = np.empty(SUB, np.uint32)
    D = np.empty(SUB, np.int32)
    below = 0
    n = 0
    for a in range(0, src.size, SUB):
        m = min(SUB, src.size - a)
        tau_trim(src[a:a + m], base[a:a + m], UF, W, seed, start + a, thr, d, drop, 0, np.float32(0.0))
        b, n = window_sub(UI[:m], np.int32(lo), np.uint32(width), D, out, n)
        below += b
    return below, n


@njit(**opts)
def high_hist_bf16(src, base, seed, start, thr, d, drop, hist):
    """hist[bits(|tau|) >> 16] += 1 for tau = float32(src) - float32(base) (DARE-dropped if ``drop``: stream
    ``seed`` from element ``start``), ``src`` and ``base`` stored bf16 bits (int16): :func:`abs_high_hist`
    without tau in memory."""
    B = np.empty(SUB, np.float32)
    U = np.empty(SUB, np.uint32)
    UF = U.view(np.float32)
    W = np.empty(SUB, np.uint32)
    for a in range(0, src.size, SUB):
        m = min(SUB, src.size - a)
        widen_bf16(base[a:a + m], B)
        tau_trim(src[a:a + m], B, UF, W, seed, start + a, thr, d, drop, 0, np.float32(0.0))
        for j in range(m):
            hist[(U[j] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1


@njit(**opts)
def narrow_bf16(src, out):
    """out = bf16 bits (int16) of float32 ``src``, rounded to nearest even as torch does; NaN -> 0x7FC0."""
    si = src.view(np.uint32)
    for j in range(src.size):
        u = si[j]
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            out[j] = np.int16(0x7FC0)
        else:
            out[j] = np.int16(np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)))


@njit(**opts)
def window(tau, lo, width, out):
    """(count of |tau| keys < lo, count n of keys in [lo, lo + width)); out[:n] = those keys - lo.
    The key of |x| is the bit pattern of x with the sign bit cleared (= ``keys(x.abs())``)."""
    ti = tau.view(np.int32)
    D = np.empty(SUB, np.int32)
    below = 0
    n = 0
    for a in range(0, ti.size, SUB):
        b, n = window_sub(ti[a:a + min(SUB, ti.size - a)], np.int32(lo), np.uint32(width), D, out, n)
        below += b
    return below, n


@njit(**opts)
def abs_high_hist(tau, hist):
    """hist[k >> 16] += 1 for the keys k of |tau| (``_radix.high_hist(keys(|tau|), nonneg=True)``)."""
    ti = tau.view(np.int32)
    for j in range(ti.size):
        hist[(ti[j] & np.int32(0x7FFFFFFF)) >> 16] += 1


GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (odd, 2^64 / golden ratio)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)  # SplitMix64's output function (Stafford's "Mix13")
MIX2 = np.uint64(0x94D049BB133111EB)
LOW32 = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)


@njit(**opts)
def mix64(z):
    """SplitMix64's output function of a uint64 state."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@njit(**opts)
def stream_words(out, seed, start):
    """out[k] = 32-bit word ``start + k`` of the stream of ``seed`` (uint64; ``_sampling``): raw output m is
    mix64(seed + (m + 1) GAMMA), word 2m its low half, word 2m + 1 its high half. Counter-based: any range
    is computed on its own, in a loop that vectorises (no serial state)."""
    n = out.size
    if n == 0:
        return
    k = 0
    m = start >> 1
    if start & 1:
        out[0] = np.uint32(mix64(seed + np.uint64(m + 1) * GAMMA) >> S32)
        k = 1
        m += 1
    z = seed + np.uint64(m + 1) * GAMMA
    pairs = (n - k) >> 1
    for j in range(pairs):
        r = mix64(z + np.uint64(j) * GAMMA)
        out[k + 2 * j] = np.uint32(r & LOW32)
        out[k + 2 * j + 1] = np.uint32(r >> S32)
    if (n - k) & 1:
        out[n - 1] = np.uint32(mix64(z + np.uint64(pairs) * GAMMA) & LOW32)


@njit(**opts)
def drop_scale(x, seed, start, thr, d):
    """DARE on a block that starts at element ``start`` of the stream of ``seed``: x <- x * [w < thr] / d
    (``_sampling.drop_rescale_block_``), the words drawn sub-block by sub-block."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    W = np.empty(SUB, np.uint32)
    for a in range(0, x.size, SUB):
        m = min(SUB, x.size - a)
        stream_words(W[:m], seed, start + a)
        for j in range(m):
            x[a + j] = (x[a + j] * (one if np.uint64(W[j]) < thr else zero)) / d


@njit(**opts)
def magprune_apply(x, order, mask, qr, seed, start):
    """DELLA's MagPrune on rows x (r, n) that start at element ``start`` of the stream of ``seed``: the
    element of in-row rank k (position ``order[i, k] & mask``) gets q = qr[k], keep = u < q with
    u = (w >> 8) 2^-24 of its stream word, x <- x * keep / q (``della._magprune_rows_``). Per row: q
    scattered to positions, then one loop in position order (vectorised, divisions included)."""
    r, n = x.shape
    one = np.float32(1.0)
    zero = np.float32(0.0)
    scale = np.float32(2.0 ** -24)
    W = np.empty(n, np.uint32)
    Q = np.empty(n, np.float32)
    for i in range(r):
        stream_words(W, seed, start + i * n)
        for k in range(n):
            Q[order[i, k] & mask] = qr[k]
        xi = x[i]
        for j in range(n):
            q = Q[j]
            u = np.float32(W[j] >> np.uint32(8)) * scale
            xi[j] = (xi[j] * (one if u < q else zero)) / q


@njit(**opts)
def band_apply(x, order, mask, lo, hi):
    """Breadcrumbs' band on rows x (r, n): the elements of in-row rank k (position ``order[i, k] & mask``)
    outside lo <= k < hi are multiplied by 0 (``x * mask`` of the torch path), the others left as they are."""
    r, n = x.shape
    zero = np.float32(0.0)
    for i in range(r):
        for k in range(n):
            if k < lo or k >= hi:
                j = order[i, k] & mask
                x[i, j] = x[i, j] * zero


@njit(**opts)
def code_shift(lo, hi, room):
    """``_rank._shift``: the least k >= 0 that fits the codes of magnitudes lo..hi into ``room`` bits."""
    if hi - lo + 1 < (np.int64(1) << room):
        return np.int64(0)
    k = np.int64(1)
    while ((hi - lo) >> (room - 1 + k)) != 0:  # k >= bit_length(hi - lo) + 1 - room
        k += 1
    while 2 * ((hi - ((lo >> k) << k) + (np.int64(1) << k)) >> k) + 1 >= (np.int64(1) << room):
        k += 1
    return k


@njit(**opts)
def row_keys32(src, B, x, xi, key, b, sub, wide, done):
    """``_rank.row_keys``'s 32-bit keys (code << b) | j of float32 rows x (r, n) (``xi``: their int32 view),
    row by row while the row is in L1; with ``sub``, x = float32(src) - B first (``src`` the bf16 bits of the
    model block, ``B`` the float32 base block or its bf16 bits, both flat), so tau is formed, ranked and keyed
    in one pass.

    Per row: a = bits(|x|), lo / hi its least nonzero / largest, k = ``code_shift(lo, hi, 32 - b)``,
    lk = lo rounded down to a multiple of 2^k, w = a - lk + 2^k, code = floor(w / 2^k) + ceil(w / 2^k)
    (w itself for k = 0), zeros 0. Even codes are exact (equal even codes mean equal a), odd codes are
    rounded. The rows whose keys cannot give the stable order are listed in ``wide`` (their keys are left
    unset; the caller uses 64-bit keys there): k >= b - 1, over n / 64 odd codes, or two equal odd codes.
    All-zero rows get the keys j, already sorted, and are listed in ``done``.
    uint32 arithmetic (8 lanes): w + low < 2^32 since k < b - 1 <= 15. Returns (wide rows, done rows)."""
    r, n = x.shape
    room = 32 - b
    ub = np.uint32(b)
    mask31 = np.int32(0x7FFFFFFF)
    zero = np.uint32(0)
    O = np.empty(n, np.uint32)  # one row's odd codes
    nw = 0
    nd = 0
    for i in range(r):
        xr = x[i]
        row = xi[i]
        if sub:
            s = src[i * n:(i + 1) * n]
            bs = B[i * n:(i + 1) * n]
            for j in range(n):  # f32_at widens bf16 bits (the base's too, when given so) in the loop
                xr[j] = f32_at(s, j) - f32_at(bs, j)
        hi = np.int32(0)
        lom = np.uint32(0xFFFFFFFF)
        for j in range(n):
            a = row[j] & mask31
            hi = max(hi, a)
            lom = min(lom, np.uint32(a) - np.uint32(1))
        if hi == 0:  # all zero (a tensor the model left as the base had it): in order already
            kr = key[i]
            for j in range(n):
                kr[j] = np.uint32(j)
            done[nd] = i
            nd += 1
            continue
        lo = min(np.int64(lom) + 1, np.int64(hi))
        k = code_shift(lo, np.int64(hi), room)
        if k >= b - 1:
            wide[nw] = i
            nw += 1
            continue
        lk = (lo >> k) << k
        base = np.uint32(((np.int64(1) << k) - lk) & 0xFFFFFFFF)  # w = a + base (mod 2^32)
        kr = key[i]
        if k == 0:
            for j in range(n):
                a = np.uint32(row[j] & mask31)
                code = np.uint32(a + base) if a != zero else zero
                kr[j] = np.uint32(code << ub) | np.uint32(j)
            continue
        uk = np.uint32(k)
        low = np.uint32((1 << k) - 1)
        anyodd = zero
        for j in range(n):
            a = np.uint32(row[j] & mask31)
            w = np.uint32(a + base)
            code = np.uint32((w >> uk) + (np.uint32(w + low) >> uk))
            nz = a != zero
            kr[j] = np.uint32((code if nz else zero) << ub) | np.uint32(j)
            anyodd |= (w & low) if nz else zero
        if anyodd == zero:
            continue
        no = 0
        for j in range(n):
            a = np.uint32(row[j] & mask31)
            w = np.uint32(a + base)
            if a != zero and (w & low) != zero:
                O[no] = np.uint32((w >> uk) + (np.uint32(w + low) >> uk))
                no += 1
                if no * 64 > n:
                    break
        bad = no * 64 > n  # many rounded magnitudes: the 64-bit keys
        if not bad and no > 1:
            O[:no].sort()
            for t in range(1, no):
                if O[t] == O[t - 1]:
                    bad = True
                    break
        if bad:
            wide[nw] = i
            nw += 1
    return nw, nd


@njit(**opts)
def linear_bf16(ms, w, unit_w, total, normalize, out):
    """:func:`linear` from the stored bf16 bits (int16) of the models, 1K sub-block by sub-block (the partial
    sums stay in L1; no float32 copy of any input): the same float32 operations in the same order."""
    zero = np.float32(0.0)
    for a in range(0, out.size, SUB):
        m = min(SUB, out.size - a)
        o = out[a:a + m]
        for j in range(m):
            o[j] = zero
        for i in range(len(ms)):
            x = ms[i][a:a + m]
            wi = w[i]
            if unit_w:
                for j in range(m):
                    o[j] = o[j] + f32_at(x, j)
            else:
                for j in range(m):
                    o[j] = fma32(f32_at(x, j), wi, o[j])
        if normalize:
            for j in range(m):
                o[j] = o[j] / total


@njit(**opts)
def consensus_ta(ts, b, lams, k, strict, lam, out):
    """Consensus TA on float32 blocks, or the bf16 bits (int16) of stored blocks (``f32_at``)
    (``consensus.consensus_ta``'s torch ops, in their order): tau_i =
    ts[i] - b, T = tau_0 + tau_1 + ..., count = sum_i [|tau_i| >= lams[i] |T - tau_i|] (``>`` if
    ``strict``), out = b + (T * [count >= k]) * lam."""
    nm = len(ts)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(b.size):
        bj = f32_at(b, j)
        s = f32_at(ts[0], j) - bj
        for i in range(1, nm):
            s = s + (f32_at(ts[i], j) - bj)
        c = 0
        for i in range(nm):
            t = f32_at(ts[i], j) - bj
            o = abs(s - t) * lams[i]
            if strict:
                c += 1 if abs(t) > o else 0
            else:
                c += 1 if abs(t) >= o else 0
        out[j] = bj + (s * (one if c >= k else zero)) * lam


@njit(**opts)
def nearswap(m, b, t, out):
    """NearSwap on float32 blocks or bf16 bits (int16; ``f32_at``): out = b + w (m - b),
    w = clamp(t * (1 / max(|m - b|, 1e-6)), 0, 1), the
    float32 operations of the torch path in its order (``t / x`` is ``x.reciprocal() * t`` in torch; NaN
    propagates through both clamps as in torch)."""
    eps = np.float32(1e-6)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for j in range(b.size):
        bj = f32_at(b, j)
        d = f32_at(m, j) - bj
        a = abs(d)
        a = eps if a < eps else a
        w = (one / a) * t
        w = zero if w < zero else (one if w > one else w)
        out[j] = bj + w * d


@njit(**opts)
def ram(ts, b, eps, scales, scaled, out):
    """RAM / RAM+ on float32 blocks or bf16 bits (``f32_at``) (``ram.ram_combine``'s float32 operations, in
    its order): tau_i = ts[i] - b counts as changed where |tau_i| > eps, c of them; out = b + tau_i * scales[i]
    where c = 1 and ``scaled``, else b + (sum of the changed tau_i) / c (b + 0 where c = 0)."""
    nm = len(ts)
    zero = np.float32(0.0)
    for j in range(b.size):
        bj = f32_at(b, j)
        s = zero
        u = zero
        c = 0
        for i in range(nm):
            t = f32_at(ts[i], j) - bj
            if abs(t) > eps:
                s = s + t
                u = t * scales[i]
                c += 1
        if c == 1 and scaled:
            out[j] = bj + u
        elif c > 1:
            out[j] = bj + s / np.float32(c)
        else:
            out[j] = bj + s


@njit(**opts)
def ram_counts(ts, b, eps, counts):
    """RAM+'s overlap counts on float32 blocks or bf16 bits: counts[i, 0] += the elements model i changed
    (|ts[i] - b| > eps) that another model changed too, counts[i, 1] += those it alone changed."""
    nm = len(ts)
    for j in range(b.size):
        bj = f32_at(b, j)
        c = 0
        last = 0
        for i in range(nm):
            if abs(f32_at(ts[i], j) - bj) > eps:
                c += 1
                last = i
        if c == 1:
            counts[last, 1] += 1
        elif c > 1:
            for i in range(nm):
                if abs(f32_at(ts[i], j) - bj) > eps:
                    counts[i, 0] += 1


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's ``llvm.fma.f32``: the FMA instruction, or its exact software form)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def f32_bits(typingctx, u):
    """The float32 whose bit pattern is the uint32 ``u`` (a bitcast: widening bf16 bits inside a loop)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def f32_at(x, j):
    """x[j] as float32: the element itself (float32 arrays) or the bf16 bits (int16 arrays) widened; numba
    picks the form by the array's type, so one kernel source reads both."""
    raise NotImplementedError("numba only")


@overload(f32_at, inline="always")
def _f32_at(x, j):
    if x.dtype == types.int16:
        return lambda x, j: f32_bits((np.uint32(x[j]) & np.uint32(0xFFFF)) << np.uint32(16))
    return lambda x, j: x[j]


@njit(**opts)
def acc_tau(x, B, tot, m, first, wi, weigh):
    """tot[:m] = 0 + tau (``first``) or tot[:m] + tau, tau = (float32(x) - B) [* wi] for the bf16 bits ``x`` of
    one model: ``merge_sub``'s sum of untrimmed task vectors (its float32 operations, in its order) in one
    pass per model, the task vector never stored."""
    zero = np.float32(0.0)
    if first and weigh:
        for j in range(m):
            tot[j] = zero + (f32_at(x, j) - B[j]) * wi
    elif first:
        for j in range(m):
            tot[j] = zero + (f32_at(x, j) - B[j])
    elif weigh:
        for j in range(m):
            tot[j] = tot[j] + (f32_at(x, j) - B[j]) * wi
    else:
        for j in range(m):
            tot[j] = tot[j] + (f32_at(x, j) - B[j])


@njit(**opts)
def linear(ms, w, unit_w, total, normalize, out):
    """out = (... fma(m_1, w_1, fma(m_0, w_0, 0)) ...) [/ total] on float32 blocks: the torch path's float32
    operations in its order (``add_(m, alpha=w)`` is a fused multiply-add on the CPU, as is mergekit's
    ``addcmul_``; with unit weights a plain sum)."""
    zero = np.float32(0.0)
    for j in range(out.size):
        out[j] = zero
    for i in range(len(ms)):
        mi = ms[i]
        wi = w[i]
        if unit_w:
            for j in range(out.size):
                out[j] = out[j] + mi[j]
        else:
            for j in range(out.size):
                out[j] = fma32(mi[j], wi, out[j])
    if normalize:
        for j in range(out.size):
            out[j] = out[j] / total


@njit(**opts)
def sparse_counts(v, hist, ids):
    """Distinct values of ``v`` (ints in [0, hist.size)) ascending in ids[:u], their counts in
    hist[ids[:u]]; returns u. ``hist`` must be all zero on entry (the caller re-zeroes those ids)."""
    u = 0
    for x in v:
        if hist[x] == 0:
            ids[u] = x
            u += 1
        hist[x] += 1
    ids[:u].sort()
    return u


@njit(**opts)
def finish(tot, m, same, S, agg, div, norm, scale, lam, bs, os_):
    """os_ = ((tot [* S]) / divisor) [* lam] + base in one pass, the operations of the separate passes in
    their order: agg 0 (mean) divides by max(div, 1) as ``div > 1``, agg 2 (weighted mean) by div unless 0,
    agg 3 by ``norm``, agg 4 (and 1, sum) not at all."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if not same and (agg == 4 or agg == 1):  # a sum (task arithmetic): loops without per-element branches
        if scale:
            for j in range(m):
                os_[j] = tot[j] * lam + bs[j]
        else:
            for j in range(m):
                os_[j] = tot[j] + bs[j]
        return
    for j in range(m):
        t = tot[j]
        if same:
            t = t * S[j]
        if agg == 0:
            t = t / (div[j] if div[j] > one else one)
        elif agg == 2:
            t = t / (div[j] if div[j] != zero else one)
        elif agg == 3:
            t = t / norm
        if scale:
            t = t * lam
        os_[j] = t + bs[j]


@njit(**opts)
def merge_sub(T, m, bs, os_, a, w, unit_w, consensus, elect_count, weighted_elect, agg, fill, deferred,
              norm, lam, scale, alt_idx, alt_val, nalt, V, S, tot, div, cnt, R):
    """Election, disjoint merge, scale and + base of one sub-block of trimmed task vectors T[:, :m]
    into os_[:m] (bs: the base's float32 values); deferred alternatives appended from ``nalt``.
    Returns (sum of the raw elected signs, new nalt)."""
    nm = T.shape[0]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    same = unit_w or weighted_elect
    weigh = not unit_w
    dv = 0
    if not consensus:
        for j in range(m):
            tot[j] = zero
        for i in range(nm):
            wi = w[i]
            Ti = T[i]
            if weigh:
                for j in range(m):
                    tot[j] = tot[j] + Ti[j] * wi
            else:
                for j in range(m):
                    tot[j] = tot[j] + Ti[j]
        finish(tot, m, False, S, 3 if norm != zero else 4, div, norm, scale, lam, bs, os_)
        return dv, nalt
    # election: votes v_i = w_i tau_i (weighted_elect) or tau_i; mass = sgn(sum v), count = sgn(sum sgn v)
    plain = not (elect_count or (weighted_elect and weigh))  # the votes are the task vectors themselves
    for i in range(nm):
        wi = w[i]
        vote = T[i]
        if not plain:
            if weighted_elect and weigh:
                for j in range(m):
                    V[j] = vote[j] * wi
            else:
                for j in range(m):
                    V[j] = vote[j]
            if elect_count:
                for j in range(m):
                    v = V[j]
                    V[j] = one if v > 0 else (-one if v < 0 else (v if v != v else zero))
            vote = V
        if i == 0:
            for j in range(m):
                S[j] = vote[j]
        else:
            for j in range(m):
                S[j] = S[j] + vote[j]
    fz = one if deferred else fill  # tentative fill +1 (Pipeline.combine_deferred)
    nz = 0
    if not deferred:  # the sign and the fill of zero signs in one pass
        for j in range(m):
            s = S[j]
            s = one if s > 0 else (-one if s < 0 else (s if s != s else zero))
            S[j] = fz if s == zero else s
    if deferred:  # the raw signs, their zeros and their integer sum in one pass (it vectorizes; a float
        vi = 0    # sum would be serial without fast-math)
        for j in range(m):
            s = S[j]
            s = one if s > 0 else (-one if s < 0 else (s if s != s else zero))
            nz += s == zero
            S[j] = s
            vi += np.int32(s)
        dv += vi
    if nz:
        if deferred:
            for j in range(m):
                s = S[j]
                R[j] = s
                S[j] = fz if s == zero else s
        else:
            for j in range(m):
                S[j] = fz if S[j] == zero else S[j]
    if deferred:  # the agreeing-model counts only serve the deferred alternatives
        for j in range(m):
            tot[j] = zero
            div[j] = zero
            cnt[j] = zero
    else:
        for j in range(m):
            tot[j] = zero
            div[j] = zero
    # disjoint merge (kernels.disjoint_merge_list); with deferred signs, each model's agreement counted in the
    # same loop (cnt: d * S > 0, d the weighted vote where the votes are weighted)
    for i in range(nm):
        wi = w[i]
        dw = wi if agg == 2 else one
        Ti = T[i]
        if same and deferred:
            for j in range(m):
                d = Ti[j] * wi if weigh else Ti[j]
                kept = d * S[j]
                kept = zero if kept <= zero else kept
                f = one if kept > zero else zero
                tot[j] = tot[j] + kept
                div[j] = div[j] + f * dw
                cnt[j] = cnt[j] + f
        elif same:
            for j in range(m):
                d = Ti[j] * wi if weigh else Ti[j]
                kept = d * S[j]
                kept = zero if kept <= zero else kept
                tot[j] = tot[j] + kept
                div[j] = div[j] + (one if kept > zero else zero) * dw
        elif deferred:
            for j in range(m):
                ag = one if Ti[j] * S[j] > zero else zero
                tot[j] = tot[j] + (Ti[j] * wi) * ag
                div[j] = div[j] + ag * dw
                cnt[j] = cnt[j] + ag
        else:
            for j in range(m):
                ag = one if Ti[j] * S[j] > zero else zero
                tot[j] = tot[j] + (Ti[j] * wi) * ag
                div[j] = div[j] + ag * dw
    finish(tot, m, same, S, agg, div, norm, scale, lam, bs, os_)
    if not deferred or nz == 0:
        return dv, nalt
    nalt_sub = 0
    for j in range(m):  # raw elected sign 0 with a vote for +1 (branch-free flags first)
        f = one if (R[j] == zero) & (cnt[j] > zero) else zero
        R[j] = f
        nalt_sub += np.int32(f)
    if nalt_sub == 0:
        return dv, nalt
    for j in range(m):  # there, the value a fill of -1 gives
        if R[j] == zero:
            continue
        t2 = zero
        d2 = zero
        for i in range(nm):
            wi = w[i]
            d = T[i, j] * wi if weigh else T[i, j]
            if same:
                kept = -d
                kept = zero if kept <= zero else kept
                t2 = t2 + kept
                ag = one if kept > zero else zero
            else:
                ag = one if -T[i, j] > zero else zero
                t2 = t2 + d * ag
            d2 = d2 + (ag * wi if agg == 2 else ag)
        t = -t2 if same else t2
        if agg == 0:
            t = t / (d2 if d2 > one else one)
        elif agg == 2:
            t = t / (d2 if d2 != zero else one)
        alt_idx[nalt] = a + j
        alt_val[nalt] = (t * lam if scale else t) + bs[j]
        nalt += 1
    return dv, nalt


@njit(**opts)
def work_buffers(nm):
    """The sub-block temporaries of the combine kernels: T (trimmed task vectors), V, S, tot, div, cnt, R."""
    return (np.empty((nm, SUB), np.float32), np.empty(SUB, np.float32), np.empty(SUB, np.float32),
            np.empty(SUB, np.float32), np.empty(SUB, np.float32), np.empty(SUB, np.float32),
            np.empty(SUB, np.float32))


@njit(**opts)
def trim_into(Ti, x, kind, lb):
    """Ti[:x.size] = x trimmed as ``kernels.trim_below`` (hardshrink at lb = nextafter(thr, 0)); kind 0:
    keep all, 1: threshold, 2: all zero."""
    zero = np.float32(0.0)
    if kind == 2:
        for j in range(x.size):
            Ti[j] = zero
    elif kind == 1:
        for j in range(x.size):
            t = x[j]
            Ti[j] = zero if (t >= -lb and t <= lb) else t
    else:
        for j in range(x.size):
            Ti[j] = x[j]


@njit(**opts)
def combine(taus, base, kind, below, w, unit_w, consensus, elect_count, weighted_elect, agg, fill,
            deferred, norm, lam, scale, out, alt_idx, alt_val):
    """theta = base + lam * merge(trim(taus)) on one block; see ``Pipeline.combine`` /
    ``combine_deferred``. ``base``: float32, or bf16 bits (int16) widened per sub-block. Returns (sum of the
    raw elected signs, number of deferred alternatives)."""
    n = base.size
    T, V, S, tot, div, cnt, R = work_buffers(len(taus))
    bits = base.itemsize == 2
    B = np.empty(SUB if bits else 0, np.float32)
    votes = 0
    nalt = 0
    for a in range(0, n, SUB):
        m = min(SUB, n - a)
        for i in range(len(taus)):
            trim_into(T[i], taus[i][a:a + m], kind[i], below[i])
        if bits:  # two calls: one numba variable cannot hold both the int16 and the float32 slice types
            widen_bf16(base[a:a + m], B)
            dv, nalt = merge_sub(T, m, B[:m], out[a:a + m], a, w, unit_w, consensus, elect_count,
                                 weighted_elect, agg, fill, deferred, norm, lam, scale, alt_idx, alt_val, nalt,
                                 V, S, tot, div, cnt, R)
        else:
            dv, nalt = merge_sub(T, m, base[a:a + m], out[a:a + m], a, w, unit_w, consensus, elect_count,
                                 weighted_elect, agg, fill, deferred, norm, lam, scale, alt_idx, alt_val, nalt,
                                 V, S, tot, div, cnt, R)
        votes += dv
    return votes, nalt


@njit(**opts)
def combine_bf16(models, base, seeds, start, thr, dd, drop, kind, below, w, unit_w, consensus, elect_count,
                 weighted_elect, agg, fill, deferred, norm, lam, scale, out, alt_idx, alt_val):
    """``combine`` straight from the stored bf16 bits (int16) of the models and the base:
    tau_i = float32(theta_i) - float32(theta_0) per sub-block, no task vector written to memory; with
    ``drop``, DARE's tau_i * [w < thr_i] / dd_i first, w the words of stream ``seeds[i]`` from element
    ``start`` (the block's first element; ``_sampling.drop_rescale_block_``)."""
    n = base.size
    T, V, S, tot, div, cnt, R = work_buffers(len(models))
    B = np.empty(SUB, np.float32)  # the base's float32 values of the sub-block
    W = np.empty(SUB, np.uint32)  # a model's stream words
    votes = 0
    nalt = 0
    # a plain weighted sum (task arithmetic): each model added in one pass, as merge_sub would
    summed = not consensus and not drop
    for i in range(len(models)):
        summed = summed and kind[i] == 0
    for a in range(0, n, SUB):
        m = min(SUB, n - a)
        widen_bf16(base[a:a + m], B)
        if summed:
            for i in range(len(models)):
                acc_tau(models[i][a:a + m], B, tot, m, i == 0, w[i], not unit_w)
            finish(tot, m, False, S, 3 if norm != np.float32(0.0) else 4, div, norm, scale, lam, B[:m], out[a:a + m])
            continue
        for i in range(len(models)):
            tau_trim(models[i][a:a + m], B, T[i], W, seeds[i], start + a, thr[i], dd[i], drop, kind[i], below[i])
        dv, nalt = merge_sub(T, m, B[:m], out[a:a + m], a, w, unit_w, consensus, elect_count,
                             weighted_elect, agg, fill, deferred, norm, lam, scale, alt_idx, alt_val, nalt,
                             V, S, tot, div, cnt, R)
        votes += dv
    return votes, nalt
