"""Seeded random streams and a block thread pool for the CPU kernels of DARE and DELLA.

Stream of a seed s (a 63-bit ``seed_for`` value, taken mod 2^64): SplitMix64 (Steele, Lea, Flood, "Fast
Splittable Pseudorandom Number Generators", OOPSLA 2014; the generator of Java's SplittableRandom and the
seeder of xoshiro) started at s, whose raw output m is

    r_m = mix64(s + (m + 1) * GAMMA  mod 2^64),   GAMMA = 0x9E3779B97F4A7C15 (Stafford's Mix13 finaliser)

cut into 32-bit words w_2m = low half of r_m, w_2m+1 = high half. Element k of a draw uses w_k:

    u_k = (w_k >> 8) * 2^-24          uniform on the float32 grid of [0, 1) (top 24 bits)
    keep_k = u_k < p_k                Bernoulli(p_k) up to the 2^-24 grid

The stream is counter-based: any block of elements is drawn on its own from its first element's index
(no serial state to jump), so blocks run on several threads, the kernels draw inside their own loops,
and the bits depend on neither the thread count nor the device. The numba kernels
(``_fused_kernels.stream_words``), the numpy form and the torch form (:func:`words_torch`, which draws on a
GPU where the merge runs) give the same words (tested against the published SplitMix64 outputs). numpy releases the GIL in its ufuncs and sorts.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from . import _fused

BLOCK = 1 << 17  # elements per work item (128K: per-item overheads amortised, temporaries ~cache-sized)
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has no pool threads: start afresh
    os.register_at_fork(after_in_child=_POOLS.clear)


GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def seed64(seed: int) -> np.uint64:
    """A stream seed as the kernels take it: the integer mod 2^64."""
    return np.uint64(int(seed) & _MASK64)


def raw_np(seed: int, first: int, count: int) -> np.ndarray:
    """Raw outputs r_first .. r_{first+count-1} of the stream of ``seed`` (uint64), by numpy (wrapping uint64
    arithmetic on arrays)."""
    z = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    z *= np.uint64(GAMMA)
    z += seed64(seed)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return z


def words(seed: int, start: int, count: int) -> np.ndarray:
    """w_start .. w_{start+count-1} of the stream of ``seed`` (uint32): by the kernel where the fused kernels
    are in use, else by numpy."""
    if count > 0 and _fused.enabled(count):
        return _fused.words(seed, start, count)
    odd = start & 1
    raw = raw_np(seed, start >> 1, (odd + count + 1) >> 1)
    return raw.astype("<u8", copy=False).view("<u4")[odd: odd + count]


def uniform_np(seed: int, start: int, count: int) -> np.ndarray:
    """u_start .. u_{start+count-1} (float32 in [0, 1))."""
    return np.multiply(words(seed, start, count) >> 8, np.float32(2.0 ** -24), dtype=np.float32)  # exact


def word_threshold(p: float) -> int:
    """C with (w >> 8) * 2^-24 < p  <=>  w < C (exact): C = 256 ceil(p 2^24), clipped to [0, 2^32]."""
    c = math.ceil(float(p) * 16777216.0) if p > 0 else 0
    return min(max(c, 0), 1 << 24) << 8


def _pool(n: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            # single-threaded torch in the workers: ops on a block run inline (no second OpenMP team)
            pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="mergesmith-kernel",
                                                  initializer=torch.set_num_threads, initargs=(1,))
        return pool


def run_blocks(total: int, step: int, fn: Callable[[int, int], None]) -> None:
    """Call fn(a, b) on [0, total) cut into ranges of ``step``, spread over torch's intra-op thread
    count. Each thread takes the next range as it gets free (the reader and writer threads share the
    cores, so a fixed split left one thread idle at the end of every chunk). fn must only write its own
    range; results must not depend on which thread runs a range."""
    step = max(1, int(step))
    nblocks = -(-total // step)
    workers = max(1, min(torch.get_num_threads(), nblocks))
    ranges = itertools.count()  # next() is atomic under the GIL

    def run() -> None:  # inf * 0 etc. give nan silently, as in torch
        with np.errstate(all="ignore"):
            for j in ranges:
                if j >= nblocks:
                    return
                fn(j * step, min(total, (j + 1) * step))

    if workers == 1:
        run()
        return
    futures = [_pool(workers).submit(run) for _ in range(workers)]
    for f in futures:
        f.result()


def _s64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


DEVICE_CHUNK = 1 << 24  # elements drawn at once on a device (int64 temporaries: 128 MB)


def words_torch(seed: int, start: int, count: int, device) -> torch.Tensor:
    """:func:`words` computed by torch int64 ops on ``device`` (int64 values in [0, 2^32)): the same bits,
    drawn where the merge runs instead of on the CPU and copied. int64 products wrap mod 2^64 in torch's CPU
    and CUDA kernels, which is SplitMix64's arithmetic on the bit patterns."""
    odd = start & 1
    m0, n_raw = start >> 1, (odd + count + 1) >> 1
    z = torch.arange(m0 + 1, m0 + n_raw + 1, dtype=torch.int64, device=device)
    z = z * _s64(GAMMA) + _s64(int(seed))
    z = z ^ _lsr(z, 30)
    z = z * _s64(_MIX1)
    z = z ^ _lsr(z, 27)
    z = z * _s64(_MIX2)
    z = z ^ _lsr(z, 31)
    w = torch.stack([z & 0xFFFFFFFF, _lsr(z, 32)], dim=1).reshape(-1)  # w_2m (low half), w_2m+1 (high half)
    return w[odd: odd + count]


def _device_mask(shape, keep_prob, seed: int, device) -> torch.Tensor:
    """:func:`bernoulli_mask` drawn on a non-CPU ``device`` by :func:`words_torch`, chunk by chunk."""
    n = math.prod(shape)
    mask = torch.empty(n, dtype=torch.bool, device=device)
    per_element = isinstance(keep_prob, torch.Tensor)
    p = keep_prob.reshape(-1) if per_element else None
    thr = None if per_element else word_threshold(keep_prob)
    for a in range(0, n, DEVICE_CHUNK):
        b = min(n, a + DEVICE_CHUNK)
        w = words_torch(seed, a, b - a, device)
        if per_element:  # u < p_k, u = (w >> 8) 2^-24 (exact in float32)
            torch.lt((w >> 8).to(torch.float32) * (2.0 ** -24), p[a:b], out=mask[a:b])
        else:  # u < p  <=>  w < thr
            torch.lt(w, thr, out=mask[a:b])
    return mask.reshape(shape)


def bernoulli_mask(shape, keep_prob, seed: int, device=None) -> torch.Tensor:
    """Boolean keep mask of ``shape``: keep_k = u_k < p (scalar ``keep_prob``) or u_k < p_k (a tensor
    broadcastable to ``shape``, compared in float32 on its device)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if isinstance(keep_prob, torch.Tensor):
        p = keep_prob.to(torch.float32)
        if tuple(p.shape) != shape:
            p = p.expand(shape)  # broadcasting, as in ``u < p``
        if p.device.type != "cpu":
            return _device_mask(shape, p.contiguous(), seed, p.device)
        pn = p.contiguous().reshape(-1).numpy()
        mask = torch.empty(n, dtype=torch.bool)
        mn = mask.numpy()

        def cmp(a: int, b: int) -> None:
            np.less(uniform_np(seed, a, b - a), pn[a:b], out=mn[a:b])

        run_blocks(n, BLOCK, cmp)
        return mask.reshape(shape)
    thr = word_threshold(keep_prob)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if thr == 0 or thr >= 1 << 32:
        return torch.full(shape, thr != 0, dtype=torch.bool, device=dev)
    if dev.type != "cpu":
        return _device_mask(shape, keep_prob, seed, dev)
    mask = torch.empty(n, dtype=torch.bool)
    mn = mask.numpy()
    t32 = np.uint32(thr)

    def cmp_scalar(a: int, b: int) -> None:
        np.less(words(seed, a, b - a), t32, out=mn[a:b])

    run_blocks(n, BLOCK, cmp_scalar)
    return mask.reshape(shape).to(dev)


def drop_rescale_block_(x: np.ndarray, d: float, seed: int, start: int) -> None:
    """In place on float32 elements start .. start+len(x)-1 of a stream: x <- x * keep / d,
    keep_k = u_k < d (any block on its own: the words are drawn from ``start``)."""
    thr = word_threshold(d)
    if thr < 1 << 32 and _fused.enabled(x.size):  # one pass: the same float32 operations
        _fused.drop_scale(x, seed, start, thr, d)
        return
    if thr < 1 << 32:
        np.multiply(x, np.less(words(seed, start, x.size), np.uint32(thr)), out=x)
    np.divide(x, np.float32(d), out=x)


class DropBlock:
    """DARE's block function ``fn(x, start)`` (:func:`drop_rescale_block_` with density ``d`` and stream
    ``seed``; d >= 1: identity), with (d, seed) readable so the fused kernels can draw in their own loop."""

    def __init__(self, d: float, seed: int):
        self.d, self.seed = float(d), int(seed)

    def __call__(self, x: torch.Tensor, start: int) -> None:
        if self.d < 1:
            drop_rescale_block_(x.numpy(), self.d, self.seed, start)

    @property
    def draw(self) -> tuple[float, int]:
        """(d, seed) for the kernels: d = 1 keeps everything and divides by 1 (exact identity)."""
        return min(self.d, 1.0), self.seed


def drop_(t: torch.Tensor, d: float, seed: int) -> torch.Tensor:
    """In place on a contiguous float32 CPU tensor: t <- t * keep with keep_k = u_k < d (the values of
    ``t * bernoulli_mask(t.shape, d, seed)``: DARE's drop before an l1/l2 rescale), one pass per block."""
    thr = word_threshold(d)
    if thr >= 1 << 32:
        return t
    flat = t.view(-1).numpy()

    def drop(a: int, b: int) -> None:
        if _fused.enabled(b - a):  # x * [w < thr] / 1: exactly x * keep
            _fused.drop_scale(flat[a:b], seed, a, thr, 1.0)
        else:
            np.multiply(flat[a:b], np.less(words(seed, a, b - a), np.uint32(thr)), out=flat[a:b])

    run_blocks(flat.size, BLOCK, drop)
    return t


def drop_rescale_(t: torch.Tensor, d: float, seed: int) -> torch.Tensor:
    """In place on a contiguous float32 CPU tensor: t <- t * keep / d with keep_k = u_k < d, one fused
    pass per block (the same values as ``t * bernoulli_mask(...) / d``)."""
    flat = t.view(-1).numpy()
    run_blocks(flat.size, BLOCK, lambda a, b: drop_rescale_block_(flat[a:b], d, seed, a))
    return t
