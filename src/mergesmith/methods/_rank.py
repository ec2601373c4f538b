"""Stable in-row magnitude order of float32 rows: the exact ranks DELLA's MagPrune and Breadcrumbs' band need.

Rank of x_j in its row: ascending by |x_j|, equal magnitudes by position (stable), i.e. the order of the
unique keys (bits(|x_j|), j) (IEEE-754 orders non-negative floats like their bit patterns; NaN above inf).
:func:`row_order` gets it from one numpy SIMD sort per row of 32-bit keys where those can order the row,
else of 64-bit keys (:func:`order64`). Buffers are per thread (the block kernels run on several threads).
"""
from __future__ import annotations

import numpy as np

from . import _fused
from . import _sampling as S

_ABS = 0x7FFFFFFF  # float32 bits & _ABS = bits of |x|: non-negative int32s ordered like |x| (NaN above inf)

def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread buffer reused by the blocks of the kernels (``_fused.scratch_np``, kept warm in cache);
    blocks of long rows (over 4 blocks) allocate instead of growing the per-thread buffers."""
    size = shape[0] * shape[1]
    if size > 4 * S.BLOCK:
        return np.empty(shape, dtype)
    return _fused.scratch_np(name, size, np.dtype(dtype)).reshape(shape)


def order64(xi: np.ndarray, b: int) -> np.ndarray:
    """Stable ascending order of |x| in each row of the int32 bit patterns ``xi``: in-row positions (int64),
    from one SIMD sort of the unique keys (bits(|x_j|) << b) | j (IEEE-754 orders non-negative floats
    like their bit patterns)."""
    key = np.left_shift(xi, b, dtype=np.int64)
    key &= _ABS << b
    key |= np.arange(xi.shape[1], dtype=np.int64)
    key.sort(axis=-1)
    key &= (1 << b) - 1
    return key


def _shift(lo: int, hi: int, room: int) -> int:
    """Least k >= 0 that fits the codes of :func:`row_order` of magnitudes lo..hi into ``room`` bits."""
    if hi - lo + 1 < 1 << room:
        return 0  # the codes are w = a - lo + 1 themselves
    k = max(1, (hi - lo).bit_length() + 1 - room)
    while 2 * ((hi - (lo >> k << k) + (1 << k)) >> k) + 1 >= 1 << room:
        k += 1
    return k


def _rounds_many(sample: np.ndarray, k: int) -> bool:
    """Whether over 1/64 of the sampled values have some of their low k bits set (odd codes at shift k):
    then rows with two equal odd codes, which the 64-bit keys redo, would be common."""
    return k > 0 and np.count_nonzero(sample & ((1 << k) - 1)) * 64 > sample.size


def row_order(x: np.ndarray) -> np.ndarray:
    """In-row positions (int64, shape of ``x``) of each float32 row in stable ascending order of |x| (the
    order of :func:`order64`): :func:`row_keys` with the positions masked out."""
    order, mask = row_keys(x)
    if order.dtype == np.int64:
        return order
    idx = scratch("idx", x.shape, np.int64)
    np.bitwise_and(order, mask, out=idx)
    return idx


def row_keys(x: np.ndarray) -> tuple[np.ndarray, int]:
    """(keys, mask): each row of ``x`` (C-contiguous float32) sorted in stable ascending order of |x|, as
    keys whose bits ``mask`` are the in-row positions (uint32 keys, or int64 positions for the rows that
    needed :func:`order64`); the order of :func:`order64`, mostly from a sort of 32-bit keys (about twice
    as fast as 64-bit ones).

    With a = bits(|x|) (31-bit), lo / hi the least nonzero / largest a (of the row in the numba kernel,
    of the block in the numpy form), k >= 0 and lk = lo rounded down to a multiple of 2^k, the code of a
    is floor(w / 2^k) + ceil(w / 2^k) with w = a - lk + 2^k (w itself when k = 0; zeros 0 or clamped to
    0). It is non-decreasing in a, and even exactly when w is a multiple of 2^k;
    so equal even codes mean equal a, and only the magnitudes rounded to a shared odd code can lose their
    order. The key (code << b) | j, b = bits of n - 1, with the least k that fits the codes into 32 - b
    bits (k = 0: codes = w, all exact), sorts as (|x|, j) unless two elements of a row share an odd code;
    such rows are redone by :func:`order64`, as are rows with many rounded magnitudes (full float32
    mantissas: low bits set), too large a k (inf/NaN) or long rows (n > 2^16).
    bf16-born task vectors have few significant bits: on the 0.5B benchmark no row needs the 64-bit keys."""
    if _fused.enabled(x.size):
        return row_keys_sub(x)
    r, n = x.shape
    b = max(1, (n - 1).bit_length())
    mask = (1 << b) - 1
    room = 32 - b
    xi = x.view(np.int32)
    sample = xi.reshape(-1)[::251]
    if b > 16 or _rounds_many(sample, min(4, b - 1)):  # long rows, or full float32 mantissas (rounded codes)
        return order64(xi, b), mask
    e = np.bitwise_and(xi, _ABS, out=scratch("e", (r, n), np.int32))
    hi = int(e.max())
    e -= 1  # zeros -> -1, as uint32 the largest value: the unsigned min is the least nonzero a, less 1
    lo = min(int(e.view(np.uint32).min()) + 1, hi)
    k = _shift(lo, hi, room)
    if k >= b - 1 or _rounds_many(sample, k):
        return order64(xi, b), mask
    key, odd_rc = _keys_numpy(e, r, n, k, lo >> k << k, b)
    redo = None
    if odd_rc is not None and odd_rc.size > 1:  # rows where two elements share an odd code
        if odd_rc.size > 64 or len(set(odd_rc.tolist())) < odd_rc.size:  # a set is cheaper for the usual few
            rc = np.sort(odd_rc)
            tied = rc[1:] == rc[:-1]
            if tied.any():
                redo = np.unique(rc[1:][tied] >> 32)
    key.sort(axis=-1)
    if redo is not None:
        key[redo] = order64(xi[redo], b)  # positions < 2^b: the mask reads them back
    return key, mask


def row_keys_sub(x: np.ndarray, m: np.ndarray | None = None, base: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """:func:`row_keys` by the numba kernel ``row_keys32`` (codes per row, while the row is in cache); with
    ``m`` (the bf16 bits, int16, of a flat model block) and ``base`` (its float32 base block, or the base's
    bf16 bits), the rows
    x = float32(m) - base are formed first, in the same pass (DELLA's task vectors never take a pass of
    their own). All-zero rows (tensors a fine-tune left unchanged, e.g. outside a merged LoRA's targets)
    skip the sort: their order is the positions."""
    r, n = x.shape
    b = max(1, (n - 1).bit_length())
    mask = (1 << b) - 1
    xi = x.view(np.int32)
    sub = m is not None
    if b > 16:  # long rows: 64-bit keys
        if sub:
            _fused.sub_into(m, _fused.float32_block(base) if base.dtype == np.int16 else base, x.reshape(-1))
        return order64(xi, b), mask
    key = scratch("key", (r, n), np.uint32)
    wide = scratch("wide", (r, 1), np.int64).reshape(-1)
    done = scratch("done", (r, 1), np.int64).reshape(-1)
    nw, nd = _fused.row_keys32(m, base, x, xi, key, b, wide, done)
    if nw + nd == 0:
        key.sort(axis=-1)
    elif nw + nd < r:  # sort only the rows with 32-bit keys not in order already
        todo = np.setdiff1d(np.arange(r), np.concatenate([done[:nd], wide[:nw]]), assume_unique=True)
        part = key[todo]
        part.sort(axis=-1)
        key[todo] = part
    if nw:
        key[wide[:nw]] = order64(xi[wide[:nw]], b)  # positions < 2^b: the mask reads them back
    return key, mask


def _keys_numpy(e: np.ndarray, r: int, n: int, k: int, lk: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`row_keys`'s keys and odd codes ((row << 32) | code) by numpy ufuncs; ``e`` = bits(|x|) - 1
    (overwritten)."""
    e -= lk - (1 << k) - 1  # w, in int32 (nonzero a: 2^k <= w < 2^31)
    odd_rc = None
    if k:
        t = np.right_shift(e, k, out=scratch("t", (r, n), np.int32))
        e += (1 << k) - 1
        e >>= k
        odd = np.flatnonzero(np.not_equal(e, t, out=scratch("odd", (r, n), np.bool_)))  # ceil != floor
        e += t
    if lk > 1 << k:  # zeros: w < 0 -> code 0
        np.maximum(e, np.zeros(n, np.int32), out=e)
    if k:
        odd_rc = (odd // n) << 32
        odd_rc |= e.reshape(-1)[odd]
    key = e.view(np.uint32)
    key <<= b
    key |= np.arange(n, dtype=np.uint32)
    return key, odd_rc


class RowSparsifier:
    """Base of the block sparsifiers that rank whole rows (DELLA's MagPrune, Breadcrumbs' band) for the GTA
    block path: subclasses define ``rows(x, start, m=None, base=None)`` in place on float32 rows ``x`` (r, row)
    whose first element is flat element ``start``; given ``m`` (the bf16 bits of the model block) and
    ``base`` (its float32 base block), x = float32(m) - base is formed first, in the ranking pass."""

    row: int

    def rows(self, x: np.ndarray, start: int, m: np.ndarray | None = None, base: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def __call__(self, x, start: int) -> None:
        """On a float32 torch block (``_gta.block_tau``)."""
        self.rows(x.numpy().reshape(-1, self.row), start)

    def from_bits(self, m: np.ndarray, base: np.ndarray, out: np.ndarray, start: int) -> None:
        """out = the sparsified float32(m) - base (``_gta.tau_block``; fused kernels loaded)."""
        self.rows(out.reshape(-1, self.row), start, m, base)
