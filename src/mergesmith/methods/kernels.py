"""Shared tensor kernels: magnitude masks, random drop masks, sign election, disjoint merge, rescaling.

Every method reuses these; none re-implements them. All functions take and return float32 tensors.
"""
from __future__ import annotations

import numpy as np
import torch


def task_vectors(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    """tau_i = theta_i - theta_0."""
    return [m - base for m in models]


def magnitude_threshold(x: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest |x| (k = max(1, int(density * numel))) as a 0-d tensor; ties at it are kept by
    ``>=`` comparisons. Uses kthvalue (O(n)), not a full argsort."""
    flat = x.reshape(-1).abs()
    n = flat.numel()
    k = max(1, int(density * n))
    return torch.kthvalue(flat, n - k + 1).values


def topk_mask(x: torch.Tensor, density: float, exact: bool = True) -> torch.Tensor:
    """Boolean mask of the top ``density`` fraction of |x| over the whole tensor.

    exact=True keeps exactly k = max(1, int(density*numel)) entries (mergekit/PEFT; ties broken by
    index); exact=False keeps every entry with |x| >= the k-th largest value (official TIES code).
    density >= 1 keeps all, density <= 0 keeps none.
    """
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    flat = x.reshape(-1).abs()
    n = flat.numel()
    k = max(1, int(density * n))
    thr = torch.kthvalue(flat, n - k + 1).values
    if not exact:
        return (flat >= thr).reshape(x.shape)
    # exactly k: everything above the k-th largest, then the lowest-index ties (= mergekit's stable
    # CPU argsort; torch.topk picks tied entries arbitrarily, see docs/mergekit_parity.md)
    mask = flat > thr
    need = k - int(mask.sum())
    if need > 0:
        mask[(flat == thr).nonzero().flatten()[:need]] = True
    return mask.reshape(x.shape)


def rowwise_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Top ``density`` fraction of |x| within each row (last dim); 0-d/1-D tensors are one row."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)
    n = rows.shape[-1]
    k = int(density * n)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(rows.abs(), k, dim=-1, sorted=False).indices
        mask.scatter_(-1, idx, True)
    return mask.reshape(x.shape)


def bernoulli_mask(shape, keep_prob: float | torch.Tensor, generator: torch.Generator | int, device=None) -> torch.Tensor:
    """Boolean i.i.d. keep mask: each entry kept with probability ``keep_prob`` (scalar or tensor).

    Drawn as ``U < p`` with U uniform in [0, 1): Bernoulli(p) exactly, about 2x faster than
    ``torch.bernoulli`` on CPU. ``generator``: a torch.Generator, or an int seed (``ctx.seed_of(i)``)
    for the multi-threaded SplitMix64 stream of :mod:`._sampling` (U on the 2^-24 grid, same bits on
    every device and thread count; several times faster on CPU)."""
    if not isinstance(generator, torch.Generator):
        from . import _sampling

        return _sampling.bernoulli_mask(shape, keep_prob, int(generator), device=device)
    if isinstance(keep_prob, torch.Tensor):
        dev = keep_prob.device
    else:
        dev = device if device is not None else generator.device
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32, device=dev)
    return u < (keep_prob.to(torch.float32) if isinstance(keep_prob, torch.Tensor) else float(keep_prob))


def rescale(original: torch.Tensor, pruned: torch.Tensor, mode: str, keep_prob=None, factor: float | None = None) -> torch.Tensor:
    """Rescale a pruned task vector.

    mode: ``inverse_keep_prob`` (the paper's 1/(1-p), per element when keep_prob is a tensor),
    ``l1`` / ``l2`` (match the norm of the original over the tensor, mergekit's default is l1;
    skipped when a norm is below 1e-7; ``factor``: the ratio of the norms when it comes from elsewhere, e.g.
    summed over the row chunks of a streamed tensor, ``_tensor_norms``), ``none``.
    """
    if mode == "none":
        return pruned
    if factor is not None and mode in ("l1", "l2"):
        return pruned * factor
    if mode == "inverse_keep_prob":
        if keep_prob is None:
            raise ValueError("inverse_keep_prob rescale needs keep_prob")
        if isinstance(keep_prob, torch.Tensor):
            return torch.where(keep_prob > 0, pruned / keep_prob.clamp_min(1e-12), torch.zeros_like(pruned))
        if keep_prob <= 0:
            return torch.zeros_like(pruned)
        return pruned / keep_prob
    ratio = norm_ratio(norm(original, mode), norm(pruned, mode))
    return pruned if ratio is None else pruned * ratio


def rescale_(t: torch.Tensor, mask_, mode: str, factor: float | None = None) -> torch.Tensor:
    """:func:`rescale` ``(t, t * keep, mode, factor=factor)`` in place, for mode l1, l2 or none: ``mask_(t)``
    multiplies ``t`` by its keep mask in place; the norms of ``t`` before and after it give the ratio. The same
    float32 operations, without the pruned and the rescaled copies of the tensor."""
    if mode == "none":
        return mask_(t)
    if factor is not None:
        return mask_(t).mul_(factor)
    n0 = norm(t, mode)
    ratio = norm_ratio(n0, norm(mask_(t), mode))
    return t if ratio is None else t.mul_(ratio)


def norm(t: torch.Tensor, mode: str) -> torch.Tensor:
    """The l1 or l2 norm of ``t`` flattened (float32, as a 0-d tensor)."""
    return torch.linalg.vector_norm(t.reshape(-1), ord={"l1": 1, "l2": 2}[mode])


def norm_ratio(n0, n1):
    """n0 / n1, the l1/l2 rescale factor, or None (no rescale) when either norm is below 1e-7."""
    return None if n0 < 1e-7 or n1 < 1e-7 else n0 / n1


def disjoint_merge(
    deltas: torch.Tensor,
    sign: torch.Tensor,
    agg: str = "mean",
    weights: torch.Tensor | None = None,
    votes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine stacked (already weighted, if desired) deltas [N, ...] keeping entries whose sign agrees
    with ``sign``. agg ``mean``: divide by the count of agreeing non-zeros (TIES dis-mean); ``sum``;
    ``max``: the agreeing entry of largest magnitude; ``weighted_mean``: divide by the sum of the
    agreeing models' ``weights`` (mergekit's normalize=True), 1 where that sum is 0.
    ``votes`` [N, ...]: judge agreement on these instead of ``deltas`` (e.g. the unweighted deltas the
    sign was elected from, while ``deltas`` are weighted).
    """
    v = deltas if votes is None else votes
    agree = (v * sign.unsqueeze(0)) > 0  # == (sgn v == sign) & (v != 0) for sign in {-1, 0, 1}
    kept = deltas * agree
    if agg == "sum":
        return kept.sum(dim=0)
    if agg == "mean":
        return kept.sum(dim=0) / agree.sum(dim=0, dtype=kept.dtype).clamp_min(1)
    if agg == "max":
        idx = kept.abs().argmax(dim=0, keepdim=True)
        return kept.gather(0, idx).squeeze(0)
    if agg == "weighted_mean":
        if weights is None:
            raise ValueError("weighted_mean needs weights")
        w = weights.reshape((-1,) + (1,) * (deltas.dim() - 1)).to(deltas)
        div = (agree * w).sum(dim=0)
        div = torch.where(div == 0, torch.ones_like(div), div)
        return kept.sum(dim=0) / div
    raise ValueError(f"unknown aggregation {agg!r}")


def trim_below(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``t`` with entries |t| < threshold set to 0 (|t| >= threshold kept), as a new tensor. One fused
    op: hardshrink keeps |t| > lambda, and for float32 |t| >= thr <=> |t| > nextafter(thr, 0)."""
    below = torch.nextafter(torch.tensor(float(threshold), dtype=t.dtype), torch.tensor(0.0, dtype=t.dtype))
    return torch.nn.functional.hardshrink(t, float(below))


def fill_zeros(sign: torch.Tensor, fill: float) -> torch.Tensor:
    """In place: entries of a {-1, 0, 1} tensor that are 0 become ``fill`` (sign + fill * (1 - |sign|))."""
    return sign.add_(sign.abs().neg_().add_(1.0), alpha=float(fill))


def elect_sign_list(votes: list[torch.Tensor], rule: str = "mass") -> torch.Tensor:
    """Elected sign per coordinate (-1, 0 or 1) from a list of deltas (no [N, ...] stack is built).

    rule ``mass``: sign of the sum (TIES paper); ``count``: sign of the sum of signs. Coordinates whose
    elected sign is 0 stay 0: fill them with :func:`fill_zeros` (+1: mergekit/PEFT; the sign of the sum
    of all elected signs: official TIES)."""
    if rule not in ("mass", "count"):
        raise ValueError(f"unknown sign rule {rule!r}")
    first = votes[0].clone() if rule == "mass" else torch.sign(votes[0])
    for v in votes[1:]:
        first.add_(v if rule == "mass" else torch.sign(v))
    return first.sign_()


def disjoint_merge_list(deltas: list[torch.Tensor], sign: torch.Tensor, agg: str = "mean",
                        weights=None, votes: list[torch.Tensor] | None = None, with_count: bool = False):
    """:func:`disjoint_merge` over a list of deltas, accumulating model by model (a few full-size
    temporaries instead of several [N, ...] ones). ``weights``: one float per delta (weighted_mean).
    ``with_count``: also return the number of votes agreeing with ``sign`` per coordinate (float)."""
    if agg == "max":
        stacked = None if votes is None else torch.stack(votes)
        out = disjoint_merge(torch.stack(deltas), sign, agg, votes=stacked)
        if not with_count:
            return out
        v = torch.stack(deltas) if stacked is None else stacked
        return out, (v * sign).clamp_min_(0).sign_().sum(dim=0)
    if agg not in ("mean", "sum", "weighted_mean"):
        raise ValueError(f"unknown aggregation {agg!r}")
    if agg == "weighted_mean" and weights is None:
        raise ValueError("weighted_mean needs weights")
    # float arithmetic only: boolean masks (where/masked_fill/bool adds) are several times slower on CPU
    same = votes is None or all(v is d for v, d in zip(votes, deltas))
    total = torch.zeros_like(sign)
    div = torch.zeros_like(sign) if agg != "sum" else None
    count = div if agg == "mean" else (torch.zeros_like(sign) if with_count else None)  # mean: div counts
    for i, d in enumerate(deltas):
        if same:
            kept = (d * sign).clamp_min_(0)  # |d| where sgn d == sign != 0, else 0
            total.add_(kept)
            agree = kept.sign_() if (div is not None or count is not None) else None
        else:
            agree = (votes[i] * sign).clamp_min_(0).sign_()  # 1.0 where the vote agrees
            total.addcmul_(d, agree)
        if div is not None:
            div.add_(agree, alpha=1.0 if agg == "mean" else float(weights[i]))
        if count is not None and count is not div:
            count.add_(agree)
    if same:
        total.mul_(sign)  # back from |d| to d
    if agg == "sum":
        out = total
    elif agg == "mean":
        out = total.div_(div.clamp_min(1) if with_count else div.clamp_min_(1))
    else:
        out = total.div_(div.add_(div == 0))  # a zero weight sum divides by 1
    return (out, count) if with_count else out


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """Monotone int32 key of non-negative float32 values (IEEE-754 order equals integer order)."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def slerp_coefficients(t: float, n0: torch.Tensor, n1: torch.Tensor, dot: torch.Tensor,
                       dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with slerp = c0 v0 + c1 v1, from the norms |v0|, |v1| and the raw dot product <v0, v1>
    (any broadcastable shapes). See :func:`slerp`."""
    one = torch.ones_like(n0)
    denom = torch.where(n0 > eps, n0, one) * torch.where(n1 > eps, n1, one)
    d = (dot / denom).clamp(-1.0, 1.0)
    omega = torch.arccos(d)
    sin_omega = torch.sin(omega)
    lerp = (d.abs() > dot_threshold) | (sin_omega.abs() < 1e-8)
    safe = torch.where(lerp, one, sin_omega)
    c0 = torch.where(lerp, one * (1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    c1 = torch.where(lerp, one * t, torch.sin(t * omega) / safe)
    return c0, c1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of each vector along the last dim (``reshape(1, -1)`` for a whole tensor).

    Shoemake 1985: d = <v0/|v0|, v1/|v1|> (a norm <= eps is not normalised), Omega = arccos(clamp(d)),
    out = sin((1-t)Omega)/sin(Omega) v0 + sin(t Omega)/sin(Omega) v1 on the *unnormalised* vectors.
    Vectors with |d| > dot_threshold (colinear or antipodal) or sin(Omega) < 1e-8 are lerped instead.
    """
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True)
    dot = torch.linalg.vecdot(v0, v1, dim=-1).unsqueeze(-1)  # no full-size temporary
    c0, c1 = slerp_coefficients(t, n0, n1, dot, dot_threshold, eps)
    out = v0 * c0
    return out.addcmul_(v1, c1)


GRAM_BLOCK = 1 << 15  # elements per block of gram() on the CPU: N x 256 KB of float64 stay in cache


def float64_blocks(vectors: list[torch.Tensor], base: torch.Tensor | None = None):
    """Yield consecutive blocks X [N, B] (float64) of the flattened x_i = v_i, or x_i = v_i - base
    (the difference formed in float32, as the methods form task vectors, then widened exactly).

    CPU tensors give numpy arrays (one reused buffer, single-threaded: torch's and BLAS's threads pay
    a synchronisation per small op, which on a busy 2-core machine made block loops 10-50x slower);
    GPU tensors give torch tensors of 4M-element blocks."""
    flat = [v.reshape(-1) for v in vectors]
    b = base.reshape(-1) if base is not None else None
    n = flat[0].numel()
    if flat[0].device.type != "cpu":
        step = 1 << 22
        for a in range(0, n, step):
            yield torch.stack([v[a:a + step] if b is None else v[a:a + step] - b[a:a + step] for v in flat]).double()
        return
    host = [_host_array(v) for v in flat]
    bh = _host_array(b) if b is not None else None
    buf = np.empty((len(host), min(n, GRAM_BLOCK)))
    for a in range(0, n, GRAM_BLOCK):
        e = min(a + GRAM_BLOCK, n)
        x = buf[:, : e - a]
        for i, v in enumerate(host):
            if bh is None:
                x[i] = v[a:e]
            else:
                np.subtract(v[a:e], bh[a:e], out=x[i])  # the float32 difference, stored as float64
        yield x


def gram(vectors: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """G_ij = <x_i, x_j> of the flattened tensors x_i = v_i, or x_i = v_i - base when ``base`` is
    given (task vectors, without materialising them), float64 [N, N].

    One pass over the inputs in float64 blocks (:func:`float64_blocks`), G += X X^T: each product is
    exact and the sums are float64. Separate float32 dot products would read every input N times and
    lose ~1e-4 (relative) on 10M-element tensors: too much for the angles of near-collinear vectors.
    Additive over row chunks, so tensor-wise methods built on norms and angles can stream
    (``MethodSpec.sums``). On the CPU the product is numpy's einsum, which uses no BLAS threads."""
    if not vectors:
        return torch.zeros(0, 0, dtype=torch.float64)
    n = len(vectors)
    if vectors[0].device.type != "cpu":
        g = torch.zeros(n, n, dtype=torch.float64, device=vectors[0].device)
        for x in float64_blocks(vectors, base):
            g.addmm_(x, x.T)
        return (g + g.T) / 2
    g = np.zeros((n, n))
    for x in float64_blocks(vectors, base):
        g += np.einsum("ij,kj->ik", x, x)
    return torch.from_numpy((g + g.T) / 2)  # exactly symmetric


def sum_squares(vectors: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """|x_i|^2 of the flattened x_i (as in :func:`gram`, its diagonal), float64 [N] on the CPU; exact
    products, float64 sums."""
    n = len(vectors)
    if n and vectors[0].device.type != "cpu":
        out = torch.zeros(n, dtype=torch.float64, device=vectors[0].device)
        for x in float64_blocks(vectors, base):
            out += (x * x).sum(dim=1)
        return out.cpu()
    out = np.zeros(n)
    for x in float64_blocks(vectors, base) if n else ():
        out += np.einsum("ij,ij->i", x, x)
    return torch.from_numpy(out)


def variance(vectors: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """Population variance across the x_i (as in :func:`gram`) per element, float32, flat, >= +0.

    Welford's recurrence in float64, rounded to float32 at the end:
    mean_1 = x_1, m2_1 = 0;  d = x_k - mean_{k-1},  mean_k = mean_{k-1} + d / k,  m2_k = m2_{k-1} + d (x_k - mean_k);
    var = m2_N / N. On the CPU this is bit for bit ``torch.var(torch.stack(xs), dim=0, unbiased=False)``
    (mergekit's SCE variance), computed in float64 blocks without the [N, ...] stack. A NaN comes out
    without its sign bit (as ``var.abs()``)."""
    n = vectors[0].numel()
    dev = vectors[0].device
    out = torch.empty(n, dtype=torch.float32, device=dev)
    host = out.numpy() if dev.type == "cpu" else None
    a = 0
    for x in float64_blocks(vectors, base):
        w = x.shape[1]
        if host is not None:
            host[a:a + w] = _welford_host(x)  # rounds to float32
        else:
            mean, m2 = x[0].clone(), torch.zeros_like(x[0])
            for k in range(1, x.shape[0]):
                d = x[k] - mean
                mean += d / (k + 1)
                m2 += d * (x[k] - mean)
            out[a:a + w] = m2 / x.shape[0]
        a += w
    return out.abs_() if host is None else torch.from_numpy(np.abs(host, out=host))


def _welford_host(x: np.ndarray) -> np.ndarray:
    """:func:`variance` of one float64 block [N, B] with numpy (overwrites ``x``)."""
    if x.shape[0] == 1:
        return np.zeros_like(x[0])
    mean, x1 = x[0], x[1]  # step 2 first: m2 = 0 + d (x_2 - mean) is the product itself
    d = np.subtract(x1, mean)
    e = np.multiply(d, 0.5)  # d / 2, exactly
    np.add(mean, e, out=mean)
    np.subtract(x1, mean, out=e)
    m2 = np.multiply(d, e, out=x1)
    for k in range(2, x.shape[0]):
        np.subtract(x[k], mean, out=d)
        np.divide(d, k + 1, out=e)
        np.add(mean, e, out=mean)
        np.subtract(x[k], mean, out=e)
        np.multiply(d, e, out=d)
        np.add(m2, d, out=m2)
    return np.divide(m2, x.shape[0], out=m2)


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array (float32/float64 kept, other dtypes as float32)."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.detach().numpy()


def slerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor, g: torch.Tensor, dot_threshold: float = 0.9995,
               eps: float = 1e-8, base: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`slerp` of two whole flattened tensors given their Gram matrix ``g`` (:func:`gram`),
    so ``v0``/``v1`` may be row chunks of the tensors ``g`` was summed over. With ``base``: the SLERP
    of the task vectors v_i - base, plus base (g is then their Gram matrix). ``out``: where to write
    the result (may be ``v0``); see :func:`combination`."""
    c0, c1 = slerp_coefficients(t, g[0, 0].sqrt(), g[1, 1].sqrt(), g[0, 1], dot_threshold, eps)
    return combination([float(c0), float(c1)], [v0, v1], base, out)


INLINE_BLOCK = 32760  # below torch's parallel grain (32768): ops on blocks this size run inline


def row_ranges(rows: int, row_len: int, size: int) -> list[tuple[int, int]]:
    """(start, end) ranges over ``rows`` rows of ``row_len`` elements (or bytes), each about ``size``
    of them and at least one row."""
    step = max(1, size // max(1, row_len))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def inline_blocks(n: int, device, size: int = INLINE_BLOCK) -> list[tuple[int, int]]:
    """(start, end) ranges over ``n`` flat elements for block loops. On the CPU below torch's parallel
    grain, so each op runs inline on the calling thread with cache-resident operands: a parallel
    region costs ~1 ms when the other core is busy (ops of 0.25-1M elements were 10-100x slower with
    2 intra-op threads on a loaded 2-core machine), and full-size passes are memory-bound. One range
    on a GPU."""
    if torch.device(device).type != "cpu":
        return [(0, n)]
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def combination(coef, vectors: list[torch.Tensor], base: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i coef_i x_i, plus base when given, with x_i = v_i - base (base given) or v_i.

    Block by block (:func:`inline_blocks`) with the float32 operations of the whole-tensor form
    ``x_0 * c_0``, ``add_(x_i, alpha=c_i)``, ``add_(base)``, so the result is the same to the bit.
    ``out``: a contiguous tensor of the inputs' shape for the result; it may be ``vectors[0]`` (then
    overwritten), not another input. Default: a new tensor."""
    flat = [v.reshape(-1) for v in vectors]
    b = base.reshape(-1) if base is not None else None
    res = torch.empty_like(vectors[0], memory_format=torch.contiguous_format) if out is None else out
    if not res.is_contiguous():
        raise ValueError("combination: out must be contiguous")
    r = res.view(-1)
    c = [float(x) for x in coef]
    for a, e in inline_blocks(r.numel(), r.device):
        acc = r[a:e]
        if b is not None:
            torch.sub(flat[0][a:e], b[a:e], out=acc)
        elif acc.data_ptr() != flat[0][a:e].data_ptr():
            acc.copy_(flat[0][a:e])
        acc.mul_(c[0])
        for v, ci in zip(flat[1:], c[1:]):
            acc.add_(v[a:e] - b[a:e] if b is not None else v[a:e], alpha=ci)
        if b is not None:
            acc.add_(b[a:e])
    return res


def tall_masks(deltas: torch.Tensor, merged: torch.Tensor, lambdas, strict: bool = False) -> torch.Tensor:
    """TALL masks (Wang et al., ICML 2024) from stacked task vectors [N, ...] and the merged vector:
    m_t = |tau_t| >= lambda_t * |merged - tau_t| (paper; strict=True gives the official code's ``>``).
    ``lambdas``: one scalar or one per task. Returns bool [N, ...]."""
    lam = torch.as_tensor(lambdas, dtype=deltas.dtype, device=deltas.device).reshape((-1,) + (1,) * (deltas.dim() - 1))
    other = (merged.unsqueeze(0) - deltas).abs() * lam
    return deltas.abs() > other if strict else deltas.abs() >= other


def svd_of_product(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD (U, S, Vh) of B @ A (B: m x R, A: R x n) without forming the m x n product:
    B = Q_b R_b, A^T = Q_a R_a, R_b R_a^T = U' S V'^T, so B A = (Q_b U') S (Q_a V')^T. O((m + n) R^2)."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def lowrank_factors(x, rank: int, split: str = "us", method: str = "exact", niter: int = 4,
                    oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a matrix: returns (A, B, S) with B @ A its best rank-``rank`` approximation
    (Eckart-Young) and S the singular values computed (all of them for ``exact``).

    x: an m x n float32 tensor, or a pair (B0, A0) standing for B0 @ A0 (then exact via
    :func:`svd_of_product`, whatever ``method``). method ``randomized``: torch.svd_lowrank with
    ``rank + oversample`` columns and ``niter`` power iterations (Halko et al. 2011), for rank << min(m, n);
    S then holds only the top singular values. split ``us``: B = U_r S_r, A = V_r^T (PEFT's
    add_weighted_adapter); ``sqrt``: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (mergekit extract-lora's
    distribute-scale)."""
    if isinstance(x, (tuple, list)):
        U, S, Vh = svd_of_product(x[0], x[1])
    elif method == "randomized" and rank + oversample < min(x.shape):
        U, S, V = torch.svd_lowrank(x, q=int(rank) + oversample, niter=niter)
        Vh = V.T
    elif method in ("exact", "randomized"):
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    else:
        raise ValueError(f"unknown svd method {method!r}")
    r = max(1, min(int(rank), S.numel()))
    if split == "us":
        return Vh[:r], U[:, :r] * S[:r], S
    if split == "sqrt":
        root = S[:r].sqrt()
        return root[:, None] * Vh[:r], U[:, :r] * root, S
    raise ValueError(f"unknown split {split!r}")
