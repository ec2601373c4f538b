"""Fused CPU kernels (numba) for the GTA block path: one pass per block instead of a dozen torch ops.

The GTA methods (TIES, DARE, DELLA) spend their time in element-wise passes: tau = theta - theta_0, the
trim, the sign election, the disjoint mean, + theta_0. On the CPU the block path (``_gta``) already
runs them on cache-sized blocks; these kernels do all of it in one loop per sub-block, straight from
the stored bf16 bits (no float32 copy of the inputs is ever made, so no page faults for fresh 16 MB
buffers). Every kernel performs the float32 operations of the torch path in the same order
(``kernels.trim_below``, ``elect_sign_list``, ``disjoint_merge_list``, ``Pipeline.combine_deferred``),
so the results are bit-identical to it (tested); nothing uses fast-math.

Also here: DARE's and DELLA's draw-and-rescale (the counter-based stream of ``_sampling``, generated in the kernels),
the histograms of the global-TIES statistics passes, and bf16 rounding of the output. The kernels live
in ``_fused_kernels`` (module-level, so numba's disk cache finds them again); this module holds the
wrappers on torch blocks and the per-thread scratch buffers.

numba is optional: without it (or with ``MERGESMITH_FUSED=0``) the torch block path runs. The kernels
are compiled once after installing (10-20 s for the set, then loaded from numba's cache) and used for
tensors of ``MIN_ELEMENTS`` or more, so a small merge never imports numba.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import torch

_KERNELS = None
_FAILED = False
_LOCK = threading.Lock()

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
                from . import _fused_kernels

                _KERNELS = _fused_kernels
            except Exception:  # noqa: BLE001 - numba missing or unusable: the torch path runs
                _FAILED = True
    return _KERNELS


def warm_in_background(trigger) -> threading.Thread | None:
    """Call ``trigger()`` in a daemon thread, then, if that loaded the kernels, run a first one. The engine
    passes a method's ``raw_inputs`` test on its first big tensor: for the methods with kernels it imports
    numba (~0.6 s), and the first kernel starts LLVM (~0.6 s); done in the background, a merge overlaps
    both with its first reads. Methods without kernels import nothing. Returns the thread; None when the
    kernels are disabled or loaded already."""
    if _KERNELS is not None or _FAILED or os.environ.get("MERGESMITH_FUSED", "1").strip().lower() in (
            "0", "false", "no", "off"):
        return None

    def warm() -> None:
        try:
            trigger()
            if _KERNELS is not None:
                _KERNELS.widen_bf16(np.zeros(1, np.int16), np.zeros(1, np.float32))
        except Exception:  # noqa: BLE001 - only a head start: the merge meets (and reports) any error itself
            pass

    thread = threading.Thread(target=warm, name="mergesmith-numba-warm", daemon=True)
    thread.start()
    return thread


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


def scratch_np(slot, n: int, dtype=np.float32) -> np.ndarray:
    """:func:`scratch` as a numpy array (the block paths' hot loops: a numpy slice costs ~0.2 us, a torch
    slice and ``.numpy()`` ~3 us, under the GIL)."""
    bufs = getattr(_SCRATCH, "np", None)
    if bufs is None:
        bufs = _SCRATCH.np = {}
    key = (slot, dtype)
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(max(n, 1 << 17), dtype)
    return buf[:n]


def host_array(t: torch.Tensor) -> np.ndarray:
    """A flat CPU tensor as the kernels read it: its bf16 bits (int16) or its float32 values (a view)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def float32_block(a: np.ndarray, slot: int = 0) -> np.ndarray:
    """The float32 values of a flat block of :func:`host_array`: the block itself, or bf16 bits widened into
    scratch ``slot``."""
    if a.dtype != np.int16:
        return a
    out = scratch_np(slot, a.size)
    _kernels().widen_bf16(a, out)
    return out


def sub_into(m: np.ndarray, base32: np.ndarray, out: np.ndarray) -> None:
    """out = float32(m) - base32 for a flat block ``m`` of :func:`host_array`."""
    if m.dtype == np.int16:
        _kernels().tau_trim(m, base32, out, _NO_WORDS, np.uint64(0), np.int64(0), np.uint64(0), np.float32(1.0),
                            False, 0, np.float32(0.0))
    else:
        np.subtract(m, base32, out=out)


def raw_ok(t: torch.Tensor) -> bool:
    """Stored dtypes the kernels read directly (others are converted to float32 per block by torch)."""
    return t.dtype in (torch.bfloat16, torch.float32) and t.device.type == "cpu" and t.is_contiguous()


def narrow_bf16(src: torch.Tensor, out: torch.Tensor) -> None:
    """out (bf16, flat) = src (float32, flat) rounded as ``src.to(torch.bfloat16)`` (NaN: 0x7FC0)."""
    _kernels().narrow_bf16(src.numpy(), out.view(torch.int16).numpy())


def narrow_into(src: np.ndarray, out_bits: np.ndarray) -> None:
    """:func:`narrow_bf16` on numpy blocks: ``out_bits`` the int16 bits of the bf16 output."""
    _kernels().narrow_bf16(src, out_bits)


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
    if m.dtype in (torch.bfloat16, torch.float32):
        sub_into(host_array(m), base32.numpy(), out.numpy())
    else:
        torch.sub(m.to(torch.float32), base32, out=out)
    return out


def combine(*args):
    """``combine`` kernel (see ``Pipeline.fused_args`` for the arguments); releases the GIL."""
    return _kernels().combine(*args)


_NO_WORDS = np.empty(0, np.uint32)


def combine_bf16(models: list[np.ndarray], base: np.ndarray, drops: tuple, start: int, *args):
    """``combine_bf16`` kernel on flat blocks of stored bf16 bits (int16: the models and the base) starting at
    element ``start``; ``drops``: :func:`drop_args` (DARE's draw per model, or none)."""
    seeds, thr, dd, drop = drops
    return _kernels().combine_bf16(tuple(models), base, seeds, np.int64(start), thr, dd, drop, *args)


def drop_args(drops: list | None, n: int) -> tuple:
    """The draw arguments of ``combine_bf16`` for ``n`` models: ``drops`` per model (d, seed) of DARE's draw
    (``_sampling.DropBlock.draw``), or None (no draw)."""
    seeds, thr, dd = _drop_args(drops, n)
    return seeds, thr, dd, drops is not None


def _drop_args(drops, n: int):
    """(uint64 stream seeds, uint64 word thresholds, float32 densities) per model for the kernels' DARE draw."""
    from ._sampling import seed64, word_threshold

    if drops is None:
        return np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.ones(n, np.float32)
    return (np.array([seed64(seed) for _, seed in drops], np.uint64),
            np.array([word_threshold(d) for d, _ in drops], np.uint64), np.array([d for d, _ in drops], np.float32))


def window_bf16(m: np.ndarray, base32: np.ndarray, lo: int, hi: int, drop: tuple, start: int = 0) -> tuple[int, np.ndarray]:
    """:func:`window` of tau = float32(m) - base for a flat block of bf16 bits ``m`` (int16) starting at element
    ``start``, DARE-dropped per ``drop`` (:func:`drop_args` of one model); tau never stored."""
    buf = scratch_np(-1, m.size, np.int32)
    seeds, thr, dd, on = drop
    below, n = _kernels().window_bf16(m, base32, seeds[0], np.int64(start), thr[0], dd[0], on, np.int32(lo),
                                      np.int32(hi - lo), buf)
    return int(below), buf[:n].copy()


def window(tau: np.ndarray, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """``_radix.window_part`` of |tau| (float32) in one pass: (count of keys below ``lo``, keys in [lo, hi) - lo)."""
    buf = scratch_np(-1, tau.size, np.int32)
    below, n = _kernels().window(tau, np.int32(lo), np.int32(hi - lo), buf)
    return int(below), buf[:n].copy()


def abs_high_hist(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_radix.high_hist(keys(tau.abs(), nonneg=True), nonneg=True)`` in one pass, ``tau`` left as it is."""
    hist = np.zeros(1 << 15, np.int64)  # keys of |x| are non-negative: high half-words in [0, 2**15)
    _kernels().abs_high_hist(tau.reshape(-1).numpy(), hist)
    idx = np.flatnonzero(hist)
    return torch.from_numpy(idx + (1 << 15)), torch.from_numpy(hist[idx])


def high_hist_bf16(m: torch.Tensor, base: torch.Tensor, drop=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`abs_high_hist` of tau = float32(m) - float32(base) for flat bf16 tensors, DARE-dropped when
    ``drop`` = (d, seed) (stream from element 0), over the kernel threads; tau never stored."""
    from ._sampling import run_blocks

    seeds, thr, dd = _drop_args(None if drop is None else [drop], 1)
    mi, bi = m.view(torch.int16).numpy(), base.view(torch.int16).numpy()
    n = mi.size
    parts = max(1, min(torch.get_num_threads(), -(-n // (1 << 16))))  # one histogram per thread
    step = -(-n // parts)
    hists = np.zeros((parts, 1 << 15), np.int64)

    def work(a: int, b: int) -> None:
        _kernels().high_hist_bf16(mi[a:b], bi[a:b], seeds[0], np.int64(a), thr[0], dd[0], drop is not None,
                                  hists[a // step])

    run_blocks(n, step, work)
    hist = hists.sum(axis=0)
    idx = np.flatnonzero(hist)
    return torch.from_numpy(idx + (1 << 15)), torch.from_numpy(hist[idx])


def drop_scale(x: np.ndarray, seed: int, start: int, thr: int, d: float) -> None:
    """In place on float32 ``x``: x <- x * [w < thr] / d (DARE's drop and rescale; w: the words of the stream
    of ``seed`` from element ``start``)."""
    from ._sampling import seed64

    _kernels().drop_scale(x, seed64(seed), np.int64(start), np.uint64(thr), np.float32(d))


def band_apply(x: np.ndarray, order: np.ndarray, mask: int, lo: int, hi: int) -> None:
    """In place on float32 rows ``x``: Breadcrumbs' band, zero outside in-row ranks lo .. hi-1 (``order``:
    sorted keys whose bits ``mask`` are the positions, ``_rank.row_keys``; see the kernel)."""
    _kernels().band_apply(x, order, order.dtype.type(mask), lo, hi)


def magprune_apply(x: np.ndarray, order: np.ndarray, mask: int, qr: np.ndarray, seed: int, start: int) -> None:
    """In place on float32 rows ``x`` (element ``start`` of the stream of ``seed`` first): MagPrune's draw and
    rescale from the in-row order (``order``, ``mask``: as :func:`band_apply`; see the kernel)."""
    from ._sampling import seed64

    _kernels().magprune_apply(x, order, order.dtype.type(mask), np.ascontiguousarray(qr, np.float32), seed64(seed),
                              np.int64(start))


def consensus_ta(ts: list[np.ndarray], base: np.ndarray, lams, k: int, strict: bool, lam: float,
                 out: np.ndarray) -> None:
    """out = Consensus TA of float32 flat blocks (task models ``ts``, ``base``; see the kernel)."""
    _kernels().consensus_ta(tuple(ts), base, np.asarray(lams, np.float32), int(k), bool(strict), np.float32(lam), out)


def linear(ms: list[np.ndarray], w, total: float | None, out: np.ndarray) -> None:
    """out = sum_i w_i m_i [/ total] of flat blocks: float32 values, or the bf16 bits (int16) of stored blocks
    (``total`` None: no division); see the kernels ``linear`` and ``linear_bf16``."""
    wf = np.asarray(w, np.float32)
    kernel = _kernels().linear_bf16 if ms[0].dtype == np.int16 else _kernels().linear
    kernel(tuple(ms), wf, bool(np.all(wf == 1)), np.float32(total or 1.0), total is not None, out)


def nearswap(m: np.ndarray, b: np.ndarray, t: float, out: np.ndarray) -> None:
    """out = NearSwap of flat blocks ``m`` (the other model) and ``b`` (the base), float32 or bf16 bits (int16,
    both); see the kernel."""
    _kernels().nearswap(m, b, np.float32(t), out)


def ram(ts: list[np.ndarray], base: np.ndarray, eps: float, scales, out: np.ndarray) -> None:
    """out = RAM (``scales`` None) or RAM+ (the float32 ``scales`` of the unique changes) of flat blocks:
    float32 values or bf16 bits (int16, all); see the kernel."""
    sc = np.ones(len(ts), np.float32) if scales is None else np.asarray(scales, np.float32)
    _kernels().ram(tuple(ts), base, np.float32(eps), sc, scales is not None, out)


def ram_counts(ts: list[np.ndarray], base: np.ndarray, eps: float, counts: np.ndarray) -> None:
    """counts (int64 [N, 2]) += RAM+'s (shared, unique) changes per model in flat blocks; see the kernel."""
    _kernels().ram_counts(tuple(ts), base, np.float32(eps), counts)


_NO_BITS = np.empty(0, np.int16)
_NO_BASE = np.empty(0, np.float32)


def row_keys32(m: np.ndarray | None, base: np.ndarray | None, x: np.ndarray, xi: np.ndarray, key: np.ndarray, b: int,
               wide: np.ndarray, done: np.ndarray) -> tuple[int, int]:
    """``_rank.row_keys_sub``'s 32-bit keys of the rows ``x`` (formed as float32(m) - base first when ``m``, the
    bf16 bits of the model block, is given); the rows that need 64-bit keys in ``wide``, the all-zero rows
    (keys in order already) in ``done``; their counts (see the kernel)."""
    sub = m is not None
    nw, nd = _kernels().row_keys32(m if sub else _NO_BITS, base if sub else _NO_BASE, x, xi, key, np.int64(b), sub,
                                   wide, done)
    return int(nw), int(nd)


def words(seed: int, start: int, count: int) -> np.ndarray:
    """``_sampling.words(seed, start, count)`` (the stream's 32-bit words start .. start+count-1) by the kernel
    (the kernels that draw make their words in their own loops; this serves the whole-tensor paths)."""
    from ._sampling import seed64

    out = np.empty(count, np.uint32)
    _kernels().stream_words(out, seed64(seed), np.int64(start))
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
