"""Fused CPU kernels (numba) for the GTA block path: one pass per block instead of a dozen torch ops.

The GTA methods (TIES, DARE, DELLA) spend their time in element-wise passes: tau = theta - theta_0, the
trim, the sign election, the disjoint mean, + theta_0. On the CPU the block path (``_gta``) already
runs them on cache-sized blocks; these kernels do all of it in one loop per sub-block, straight from
the stored bf16 bits (no float32 copy of the inputs is ever made, so no page faults for fresh 16 MB
buffers). Every kernel performs the float32 operations of the torch path in the same order
(``kernels.trim_below``, ``elect_sign_list``, ``disjoint_merge_list``, ``Pipeline.combine_deferred``),
so the results are bit-identical to it (tested); nothing uses fast-math.

numba is optional: without it (or with ``MERGESMITH_FUSED=0``) the torch block path runs. Kernels are
compiled on first use (about 2-5 s, cached on disk by numba) and only for tensors of at least two
blocks, so small merges never import numba.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

_KERNELS = None
_FAILED = False
_LOCK = threading.Lock()
SUB = 1024  # elements per sub-block inside a kernel (a few KB per model: L1-resident)

# kinds of trim per model (``combine``)
KEEP, THRESHOLD, ZERO = 0, 1, 2
AGG = {"mean": 0, "sum": 1, "weighted_mean": 2}


MIN_ELEMENTS = 1 << 16  # below this many elements a call site does not import numba for itself


def enabled(n: int | None = None) -> bool:
    """Whether the fused kernels may be used: numba importable and ``MERGESMITH_FUSED`` not ``0``.
    ``n``: elements the caller is about to process; under ``MIN_ELEMENTS`` the answer is yes only if
    the kernels are loaded already, so a small merge never pays for importing numba."""
    if os.environ.get("MERGESMITH_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _KERNELS is None and n is not None and n < MIN_ELEMENTS:
        return False
    return _kernels() is not None


def _kernels():
    global _KERNELS, _FAILED
    if _KERNELS is not None or _FAILED:
        return _KERNELS
    with _LOCK:
        if _KERNELS is None and not _FAILED:
            try:
                _KERNELS = _compile()
            except Exception:  # noqa: BLE001 - numba missing or unusable: the torch path runs
                _FAILED = True
    return _KERNELS


def _compile():
    from types import SimpleNamespace

    import numba
    from numba import njit

    opts = dict(nogil=True, cache=True, boundscheck=False, fastmath=False, error_model="numpy")

    @njit(**opts)
    def widen_bf16(src, out):
        """out = float32 of the bf16 bit patterns ``src`` (int16): exact."""
        ou = out.view(np.uint32)
        for j in range(src.size):
            ou[j] = (np.uint32(src[j]) & np.uint32(0xFFFF)) << np.uint32(16)

    @njit(**opts)
    def sub_bf16(src, base, out):
        """out = float32(src) - base; ``src`` bf16 bits (int16), ``base`` float32."""
        ou = out.view(np.uint32)
        for j in range(src.size):
            ou[j] = (np.uint32(src[j]) & np.uint32(0xFFFF)) << np.uint32(16)
        for j in range(src.size):
            out[j] = out[j] - base[j]

    @njit(**opts)
    def window_bf16(src, base, lo, width, out):
        """``window`` of tau = float32(src) - base, ``src`` the stored bf16 bits (int16): tau not kept.
        Per sub-block: keys and both counts in vectorised loops, then the (few) inside keys compacted."""
        U = np.empty(SUB, np.uint32)
        UF = U.view(np.float32)
        D = np.empty(SUB, np.int32)
        below = 0
        n = 0
        uw = np.uint32(width)
        lo32 = np.int32(lo)
        for a in range(0, src.size, SUB):
            m = min(SUB, src.size - a)
            x = src[a:a + m]
            for j in range(m):
                U[j] = (np.uint32(x[j]) & np.uint32(0xFFFF)) << np.uint32(16)
            for j in range(m):
                UF[j] = UF[j] - base[a + j]
            ins = 0
            for j in range(m):
                d = np.int32(U[j] & np.uint32(0x7FFFFFFF)) - lo32
                D[j] = d
                below += 1 if d < 0 else 0
                ins += 1 if np.uint32(d) < uw else 0
            if ins:
                for j in range(m):
                    if np.uint32(D[j]) < uw:
                        out[n] = D[j]
                        n += 1
        return below, n

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
        The key of |x| is the bit pattern of x with the sign bit cleared (= ``keys(x.abs())``). Counts in
        vectorised loops per sub-block, then the (few, ~2 %) inside keys compacted."""
        ti = tau.view(np.int32)
        D = np.empty(SUB, np.int32)
        below = 0
        n = 0
        uw = np.uint32(width)
        lo32 = np.int32(lo)
        for a in range(0, ti.size, SUB):
            m = min(SUB, ti.size - a)
            ins = 0
            for j in range(m):
                d = (ti[a + j] & np.int32(0x7FFFFFFF)) - lo32
                D[j] = d
                below += 1 if d < 0 else 0
                ins += 1 if np.uint32(d) < uw else 0
            if ins:
                for j in range(m):
                    if np.uint32(D[j]) < uw:
                        out[n] = D[j]
                        n += 1
        return below, n

    @njit(**opts)
    def abs_high_hist(tau, hist):
        """hist[k >> 16] += 1 for the keys k of |tau| (``_radix.high_hist(keys(|tau|), nonneg=True)``)."""
        ti = tau.view(np.int32)
        for j in range(ti.size):
            hist[(ti[j] & np.int32(0x7FFFFFFF)) >> 16] += 1

    M_HI = np.uint64(0x2360ED051FC65DA4)  # PCG_DEFAULT_MULTIPLIER_128 (numpy's PCG64)
    M_LO = np.uint64(0x4385DF649FCCF645)
    LOW32 = np.uint64(0xFFFFFFFF)
    S32 = np.uint64(32)

    @njit(**opts)
    def mulhi64(a, b):
        """High 64 bits of the 128-bit product of uint64 a, b."""
        a0, a1 = a & LOW32, a >> S32
        b0, b1 = b & LOW32, b >> S32
        p0, p1, p2, p3 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
        mid = (p0 >> S32) + (p1 & LOW32) + (p2 & LOW32)
        return p3 + (p1 >> S32) + (p2 >> S32) + (mid >> S32)

    @njit(**opts)
    def pcg_words(out, s_hi, s_lo, i_hi, i_lo, odd):
        """out[k] = 32-bit word ``odd + k`` of PCG64 (XSL-RR 128/64) from state (s_hi, s_lo), increment
        (i_hi, i_lo): raw output r gives words 2r (low half) and 2r + 1 (high half), as numpy's
        ``random_raw`` viewed as little-endian uint32."""
        n = out.size
        k = 0
        w = odd
        while k < n:
            hi = mulhi64(s_lo, M_LO) + s_lo * M_HI + s_hi * M_LO  # state = state * M + inc (mod 2^128)
            lo = s_lo * M_LO
            s_lo = lo + i_lo
            s_hi = hi + i_hi + (np.uint64(1) if s_lo < lo else np.uint64(0))
            x = s_hi ^ s_lo
            rot = s_hi >> np.uint64(58)
            r = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))
            if w == 0 and k < n:
                out[k] = np.uint32(r & LOW32)
                k += 1
            if k < n:
                out[k] = np.uint32(r >> S32)
                k += 1
            w = 0

    @njit(**opts)
    def drop_scale(x, w, thr, d):
        """DARE on one block: x <- x * [w < thr] / d (``_sampling.drop_rescale_block_``)."""
        one = np.float32(1.0)
        zero = np.float32(0.0)
        for j in range(x.size):
            x[j] = (x[j] * (one if np.uint64(w[j]) < thr else zero)) / d

    @njit(**opts)
    def magprune_apply(x, order, qr, w):
        """DELLA's MagPrune on rows x (r, n): the element of in-row rank k (``order[i, k]``) gets q = qr[k],
        keep = u < q with u = (w >> 8) 2^-24 of its stream word, x <- x * keep / q (``della._magprune_rows_``)."""
        r, n = x.shape
        one = np.float32(1.0)
        zero = np.float32(0.0)
        scale = np.float32(2.0 ** -24)
        for i in range(r):
            for k in range(n):
                j = order[i, k]
                q = qr[k]
                u = np.float32(w[i * n + j] >> np.uint32(8)) * scale
                x[i, j] = (x[i, j] * (one if u < q else zero)) / q

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
            if norm != zero:
                for j in range(m):
                    tot[j] = tot[j] / norm
            if scale:
                for j in range(m):
                    tot[j] = tot[j] * lam
            for j in range(m):
                os_[j] = tot[j] + bs[j]
            return dv, nalt
        # election: votes v_i = w_i tau_i (weighted_elect) or tau_i; mass = sgn(sum v), count = sgn(sum sgn v)
        for i in range(nm):
            wi = w[i]
            Ti = T[i]
            if weighted_elect and weigh:
                for j in range(m):
                    V[j] = Ti[j] * wi
            else:
                for j in range(m):
                    V[j] = Ti[j]
            if elect_count:
                for j in range(m):
                    v = V[j]
                    V[j] = one if v > 0 else (-one if v < 0 else (v if v != v else zero))
            if i == 0:
                for j in range(m):
                    S[j] = V[j]
            else:
                for j in range(m):
                    S[j] = S[j] + V[j]
        nz = 0
        for j in range(m):
            s = S[j]
            s = one if s > 0 else (-one if s < 0 else (s if s != s else zero))
            nz += s == zero
            S[j] = s
        if deferred:
            vi = 0
            for j in range(m):  # an integer sum vectorizes (a float one is serial without fast-math)
                vi += np.int32(S[j])
            dv += vi
        fz = one if deferred else fill  # tentative fill +1 (Pipeline.combine_deferred)
        if nz:
            if deferred:
                for j in range(m):
                    R[j] = S[j]
            for j in range(m):
                S[j] = fz if S[j] == zero else S[j]
        for j in range(m):
            tot[j] = zero
            div[j] = zero
            cnt[j] = zero
        # disjoint merge (kernels.disjoint_merge_list)
        for i in range(nm):
            wi = w[i]
            dw = wi if agg == 2 else one
            Ti = T[i]
            if same:
                for j in range(m):
                    d = Ti[j] * wi if weigh else Ti[j]
                    kept = d * S[j]
                    kept = zero if kept <= zero else kept
                    tot[j] = tot[j] + kept
                    ag = one if kept > zero else zero
                    div[j] = div[j] + ag * dw
                    cnt[j] = cnt[j] + ag
            else:
                for j in range(m):
                    ag = one if Ti[j] * S[j] > zero else zero
                    tot[j] = tot[j] + (Ti[j] * wi) * ag
                    div[j] = div[j] + ag * dw
                    cnt[j] = cnt[j] + ag
        if same:
            for j in range(m):
                tot[j] = tot[j] * S[j]
        if agg == 0:
            for j in range(m):
                tot[j] = tot[j] / (div[j] if div[j] > one else one)
        elif agg == 2:
            for j in range(m):
                tot[j] = tot[j] / (div[j] if div[j] != zero else one)
        if scale:
            for j in range(m):
                tot[j] = tot[j] * lam
        for j in range(m):
            os_[j] = tot[j] + bs[j]
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
    def combine(taus, base, kind, below, w, unit_w, consensus, elect_count, weighted_elect, agg, fill,
                deferred, norm, lam, scale, out, alt_idx, alt_val):
        """theta = base + lam * merge(trim(taus)) on one block; see ``Pipeline.combine`` /
        ``combine_deferred``. Returns (sum of the raw elected signs, number of deferred alternatives).
        Loop-invariant switches are tested outside the inner loops, which are branch-free selects."""
        n = base.size
        nm = len(taus)
        T = np.empty((nm, SUB), np.float32)  # trimmed task vectors of the sub-block
        V = np.empty(SUB, np.float32)  # one model's vote
        S = np.empty(SUB, np.float32)  # elected sign (raw), then filled
        tot = np.empty(SUB, np.float32)
        div = np.empty(SUB, np.float32)
        cnt = np.empty(SUB, np.float32)
        R = np.empty(SUB, np.float32)  # the raw elected sign (deferred majority)
        zero = np.float32(0.0)
        votes = 0
        nalt = 0
        for a in range(0, n, SUB):
            m = min(SUB, n - a)
            for i in range(nm):  # trim (kernels.trim_below is hardshrink at nextafter(thr, 0))
                x = taus[i][a:a + m]
                lb = below[i]
                Ti = T[i]
                if kind[i] == 2:
                    for j in range(m):
                        Ti[j] = zero
                elif kind[i] == 1:
                    for j in range(m):
                        t = x[j]
                        Ti[j] = zero if (t >= -lb and t <= lb) else t
                else:
                    for j in range(m):
                        Ti[j] = x[j]
            dv, nalt = merge_sub(T, m, base[a:a + m], out[a:a + m], a, w, unit_w, consensus, elect_count,
                                 weighted_elect, agg, fill, deferred, norm, lam, scale, alt_idx, alt_val, nalt,
                                 V, S, tot, div, cnt, R)
            votes += dv
        return votes, nalt

    @njit(**opts)
    def combine_bf16(models, base, kind, below, w, unit_w, consensus, elect_count, weighted_elect, agg, fill,
                     deferred, norm, lam, scale, out, alt_idx, alt_val):
        """``combine`` straight from the stored bf16 bits (int16) of the models and the base:
        tau_i = float32(theta_i) - float32(theta_0) per sub-block, no task vector written to memory."""
        n = base.size
        nm = len(models)
        T = np.empty((nm, SUB), np.float32)
        B = np.empty(SUB, np.float32)  # the base's float32 values of the sub-block
        U = np.empty(SUB, np.uint32)  # one model's widened bits
        BU = B.view(np.uint32)
        UF = U.view(np.float32)
        V = np.empty(SUB, np.float32)
        S = np.empty(SUB, np.float32)
        tot = np.empty(SUB, np.float32)
        div = np.empty(SUB, np.float32)
        cnt = np.empty(SUB, np.float32)
        R = np.empty(SUB, np.float32)
        zero = np.float32(0.0)
        mask = np.uint32(0xFFFF)
        sh = np.uint32(16)
        votes = 0
        nalt = 0
        for a in range(0, n, SUB):
            m = min(SUB, n - a)
            bb = base[a:a + m]
            for j in range(m):
                BU[j] = (np.uint32(bb[j]) & mask) << sh
            for i in range(nm):
                x = models[i][a:a + m]
                for j in range(m):
                    U[j] = (np.uint32(x[j]) & mask) << sh
                lb = below[i]
                Ti = T[i]
                if kind[i] == 2:
                    for j in range(m):
                        Ti[j] = zero
                elif kind[i] == 1:
                    for j in range(m):
                        t = UF[j] - B[j]
                        Ti[j] = zero if (t >= -lb and t <= lb) else t
                else:
                    for j in range(m):
                        Ti[j] = UF[j] - B[j]
            dv, nalt = merge_sub(T, m, B[:m], out[a:a + m], a, w, unit_w, consensus, elect_count,
                                 weighted_elect, agg, fill, deferred, norm, lam, scale, alt_idx, alt_val, nalt,
                                 V, S, tot, div, cnt, R)
            votes += dv
        return votes, nalt

    del numba
    return SimpleNamespace(widen_bf16=widen_bf16, sub_bf16=sub_bf16, window=window, abs_high_hist=abs_high_hist,
                           combine=combine, combine_bf16=combine_bf16, drop_scale=drop_scale, magprune_apply=magprune_apply,
                           pcg_words=pcg_words, narrow_bf16=narrow_bf16, window_bf16=window_bf16, sparse_counts=sparse_counts)


# --------------------------------------------------------------------------------------------------
# Wrappers on torch blocks


_SCRATCH = threading.local()


def scratch(slot: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """A per-thread reusable flat buffer of ``n`` elements for slot ``slot`` (block temporaries: fresh
    512 KB allocations cost a page fault per 4 KB on every block). Valid until the same thread asks for
    the same slot again."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (slot, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(max(n, 1 << 17), dtype=dtype)
    return buf[:n]


def raw_ok(t: torch.Tensor) -> bool:
    """Stored dtypes the kernels read directly (others are converted to float32 per block by torch)."""
    return t.dtype in (torch.bfloat16, torch.float32) and t.device.type == "cpu" and t.is_contiguous()


def narrow_bf16(src: torch.Tensor, out: torch.Tensor) -> None:
    """out (bf16, flat) = src (float32, flat) rounded as ``src.to(torch.bfloat16)`` (NaN: 0x7FC0)."""
    _kernels().narrow_bf16(src.numpy(), out.view(torch.int16).numpy())


def as_float32(block: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """A float32 view (float32 input) or a float32 copy of one flat block in scratch ``slot``."""
    if block.dtype == torch.float32:
        return block
    out = scratch(slot, block.numel())
    if block.dtype == torch.bfloat16:
        _kernels().widen_bf16(block.view(torch.int16).numpy(), out.numpy())
        return out
    return out.copy_(block)


def sub(m: torch.Tensor, base32: torch.Tensor, slot: int | None = None) -> torch.Tensor:
    """tau = float32(m) - base on one flat block: a new float32 tensor, or scratch ``slot``."""
    n = base32.numel()
    out = torch.empty(n, dtype=torch.float32) if slot is None else scratch(slot, n)
    if m.dtype == torch.bfloat16:
        _kernels().sub_bf16(m.view(torch.int16).numpy(), base32.numpy(), out.numpy())
    elif m.dtype == torch.float32:
        np.subtract(m.numpy(), base32.numpy(), out=out.numpy())
    else:
        torch.sub(m.to(torch.float32), base32, out=out)
    return out


def combine(*args):
    """``combine`` kernel (see ``Pipeline.fused_args`` for the arguments); releases the GIL."""
    return _kernels().combine(*args)


def combine_bf16(models: list[torch.Tensor], base: torch.Tensor, *args):
    """``combine_bf16`` kernel on flat bf16 blocks (the models and the base as stored)."""
    return _kernels().combine_bf16(tuple(m.view(torch.int16).numpy() for m in models),
                                   base.view(torch.int16).numpy(), *args)


def window_bf16(m: torch.Tensor, base32: torch.Tensor, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """:func:`window` of tau = float32(m) - base for a flat bf16 block ``m`` (tau never stored)."""
    buf = scratch(-1, m.numel(), torch.int32).numpy()
    below, n = _kernels().window_bf16(m.view(torch.int16).numpy(), base32.numpy(), np.int32(lo), np.int32(hi - lo), buf)
    return int(below), buf[:n].copy()


def window(tau: torch.Tensor, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """``_radix.window_part`` of |tau| in one pass: (count of keys below ``lo``, keys in [lo, hi) - lo)."""
    buf = scratch(-1, tau.numel(), torch.int32).numpy()
    below, n = _kernels().window(tau.numpy(), np.int32(lo), np.int32(hi - lo), buf)
    return int(below), buf[:n].copy()


def abs_high_hist(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_radix.high_hist(keys(tau.abs(), nonneg=True), nonneg=True)`` in one pass, ``tau`` left as it is."""
    hist = np.zeros(1 << 15, np.int64)  # keys of |x| are non-negative: high half-words in [0, 2**15)
    _kernels().abs_high_hist(tau.reshape(-1).numpy(), hist)
    idx = np.flatnonzero(hist)
    return torch.from_numpy(idx + (1 << 15)), torch.from_numpy(hist[idx])


def drop_scale(x: np.ndarray, w: np.ndarray, thr: int, d: float) -> None:
    """In place on float32 ``x``: x <- x * [w < thr] / d (DARE's drop and rescale; ``w``: uint32 stream words)."""
    _kernels().drop_scale(x, w, np.uint64(thr), np.float32(d))


def magprune_apply(x: np.ndarray, order: np.ndarray, qr: np.ndarray, w: np.ndarray) -> None:
    """In place on float32 rows ``x``: MagPrune's draw and rescale from the in-row order (see the kernel)."""
    _kernels().magprune_apply(x, order, np.ascontiguousarray(qr, np.float32), w)


_PCG = threading.local()


def words(seed: int, start: int, count: int) -> np.ndarray:
    """``_sampling.words(seed, start, count)`` (PCG64's 32-bit words start .. start+count-1) generated by the
    kernel: numpy's ``random_raw`` costs ~4 ns per output through a function pointer. The generator is
    jumped with numpy's ``advance`` (from a per-thread cached seeding), so the stream is numpy's."""
    cache = getattr(_PCG, "gens", None)
    if cache is None:
        cache = _PCG.gens = {}
    got = cache.get(seed)
    if got is None:
        if len(cache) > 64:
            cache.clear()
        bg = np.random.PCG64(int(seed))
        got = cache[seed] = (bg, bg.state)
    bg, st0 = got
    bg.state = st0
    if start >= 2:
        bg.advance(start // 2)
    st = bg.state["state"]
    s, inc = int(st["state"]), int(st["inc"])
    out = scratch(-4, count, torch.int32).numpy().view(np.uint32)
    m = (1 << 64) - 1
    _kernels().pcg_words(out, np.uint64(s >> 64), np.uint64(s & m), np.uint64(inc >> 64), np.uint64(inc & m),
                         start & 1)
    return out


def sparse_counts(v: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_radix.sparse_hist`` of int32 ``v`` in [0, size): (ascending distinct values, their counts), int64,
    through a per-thread dense histogram that is reset entry by entry (no 4 MB zero-fill per call)."""
    hist = getattr(_SCRATCH, "hist", None)
    if hist is None or hist.size < size:
        hist = _SCRATCH.hist = np.zeros(max(size, 1 << 16), np.int64)
    ids = np.empty(min(v.size, size), np.int64)
    u = _kernels().sparse_counts(v, hist, ids)
    ids = ids[:u]
    cnt = hist[ids].copy()
    hist[ids] = 0
    return torch.from_numpy(ids), torch.from_numpy(cnt)
