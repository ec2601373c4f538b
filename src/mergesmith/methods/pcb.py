"""PCB-Merging (Parameter Competition Balancing).

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (arXiv 2410.02396);
official code duguodong7/pcb-merging (``PCB_merge``; vision variant ``vision_source_code/pcb.py``).

With T_i = theta_i - theta_0 and, per task i over the whole model (scope=global, the paper) or over
one tensor (scope=tensor, a per-tensor port for very large models):

0. clip      |T_i| to [lo_i, hi_i], the order statistics of rank floor(cP) and P-1-floor(cP) of |T_i|
             (P entries, c = ``clip``); T^c_i = sgn(T_i) |T_i|_clipped
1. intra     exp(t * mm(|T^c_i|)^2), mm(x) = (x - min)/(max - min) = (x - lo_i)/(hi_i - lo_i), t = N
2. inter     tanh(T_i * sum_j T_j)                          (inter=nlp, the NLP code and paper)
             tanh(T_i * sum_j sgn(T_j) mm(|T^c_j|))          (inter=vision, the vision code)
3. B_i       intra * inter
4. drop      s_i = B_i of rank floor(P(1-r)); B^_i = mm(max(B_i, s_i)) = (max(B_i, s_i) - s_i)/(max B_i - s_i)
5. merge     tau = sum_i B^_i w_i T^c_i / max(sum_i B^_i, 1e-12);   theta = theta_0 + lambda * tau

Global statistics are exact and streamed (4 passes: two radix-selection passes for the clip bounds,
two for the drop threshold and max B_i; see ``_radix``) — the whole model is never materialised.

Differences from the official code, on purpose: the upper clip rank is the symmetric P-1-floor(cP)
(the code takes floor(P(1-c)-1), one rank lower when cP is fractional, so for P < 1/c it clips the
largest entry to the second largest); a constant row, where the code's min-max divides 0 by 0, is
treated as all ones (intra) or as the keep mask B_i >= s_i (drop). The paper's softmax in the intra
term is a per-task constant that cancels in step 4's normalisation, as in the code.
"""
from __future__ import annotations

import torch

from ._radix import Selection, kth_smallest
from .base import GlobalStats, MergeError, Param, register
from .kernels import task_vectors


def _check(p) -> None:
    r, c = p["ratio"], p["clip"]
    if not 0 < r <= 1:
        raise MergeError(f"pcb: ratio must be in (0, 1] (the kept fraction of PCB scores), got {r}")
    if not 0 <= c < 0.5:
        raise MergeError(f"pcb: clip must be in [0, 0.5), got {c}")


def _clip_ranks(n: int, clip: float) -> tuple[int, int]:
    """1-based ranks of the clip bounds (0-based floor(cP) and P-1-floor(cP))."""
    c = int(n * clip)
    return c + 1, n - c


def _drop_rank(n: int, ratio: float) -> int:
    """1-based rank of the drop threshold (0-based floor(P(1-r)), at most P-1)."""
    return min(n, int(n * (1.0 - ratio)) + 1)


def _col(v, like: torch.Tensor) -> torch.Tensor:
    """Per-task values [N] shaped to broadcast over stacked deltas [N, ...]."""
    return torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def _scores(T: torch.Tensor, lo, hi, p) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped deltas T^c, PCB balancing matrix B) for stacked deltas T [N, ...]. In place where the
    values allow (the float32 operations of the plain formulas, in their order): a handful of [N, ...]
    temporaries instead of a dozen."""
    n = T.shape[0]
    lo, hi = _col(lo, T), _col(hi, T)
    a = T.abs()
    torch.maximum(a, lo, out=a)
    torch.minimum(a, hi, out=a)  # a = clip(|T|, lo, hi)
    span = hi - lo
    flat = span <= 0
    mm = torch.sub(a, lo).div_(torch.where(flat, torch.ones_like(span), span))
    if bool(flat.any()):
        mm.masked_fill_(flat.expand_as(mm), 1.0)  # min-max of a constant: 1
    temp = p["intra_temperature"] if p["intra_temperature"] is not None else float(n)
    if p["inter"] == "vision":
        inter = T * torch.sign(T).mul_(mm).sum(0)
    else:
        inter = T * T.sum(0)
    intra = torch.mul(mm, temp).mul_(mm).exp_()  # exp(temp * mm * mm)
    del mm
    return torch.sign(T).mul_(a), intra.mul_(inter.tanh_())


def _combine(base, T, lo, hi, thr, bmax, p) -> torch.Tensor:
    Tc, B = _scores(T, lo, hi, p)
    thr, bmax = _col(thr, T), _col(bmax, T)
    span = bmax - thr
    flat = span <= 0
    scale = torch.maximum(B, thr).sub_(thr).div_(torch.where(flat, torch.ones_like(span), span))
    for i in torch.nonzero(flat.reshape(-1)).reshape(-1).tolist():  # no spread of scores: a 0/1 step
        scale[i] = (B[i] >= thr[i]).to(B.dtype)
    del B
    tau = (scale * _col(p["weight"], T)).mul_(Tc).sum(0)
    del Tc
    return base + p["lambda"] * tau.div_(scale.sum(0).clamp_min_(1e-12))


def _tensor_stats(T: torch.Tensor, p) -> tuple[list, list, list, list]:
    """Per-tensor statistics (scope=tensor): the same order statistics as the global pass."""
    n = T[0].numel()
    lo_r, hi_r = _clip_ranks(n, p["clip"])
    A = T.abs().reshape(T.shape[0], -1)
    lo = [kth_smallest(a, lo_r, nonneg=True) for a in A]
    hi = [kth_smallest(a, hi_r, nonneg=True) for a in A]
    _, B = _scores(T, lo, hi, p)
    B = B.reshape(T.shape[0], -1)
    d = _drop_rank(n, p["ratio"])
    return lo, hi, [kth_smallest(b, d) for b in B], B.amax(1).tolist()


class PCBStats(GlobalStats):
    """Whole-model PCB statistics per task: clip bounds (passes 0-1), drop threshold and max of the
    balancing scores (passes 2-3). State: two radix selections and one float per task."""

    def passes(self, params, state=None) -> int:
        return 4

    def init(self, params, num_models: int):
        _check(params)
        return {"clip": [Selection(nonneg=True) for _ in range(num_models)], "drop": [Selection() for _ in range(num_models)],
                "bmax": [float("-inf")] * num_models, "p": params}

    def bounds(self, state) -> tuple[list, list]:
        lo = [s.value(min(s.ranks)) for s in state["clip"]]
        hi = [s.value(max(s.ranks)) for s in state["clip"]]
        return lo, hi

    def collect(self, k, state, ctx, base, models, p):
        T = torch.stack(task_vectors(base, models))
        if k < 2:
            return [sel.partial(T[i].abs()) for i, sel in enumerate(state["clip"])]
        _, B = _scores(T, *self.bounds(state), state["p"])
        parts = [sel.partial(B[i]) for i, sel in enumerate(state["drop"])]
        if k == 2:
            mx = B.reshape(B.shape[0], -1).amax(1).tolist() if B[0].numel() else [float("-inf")] * B.shape[0]
            return parts, mx
        return parts

    def reduce(self, k, state, partials):
        p = state["p"]
        if k < 2:
            for i, sel in enumerate(state["clip"]):
                sel.reduce([pt[i] for pt in partials], ranks=lambda n: list(_clip_ranks(n, p["clip"])))
            return state
        if k == 2:
            state["bmax"] = [max([state["bmax"][i]] + [mx[i] for _, mx in partials]) for i in range(len(state["drop"]))]
            partials = [parts for parts, _ in partials]
        for i, sel in enumerate(state["drop"]):
            sel.reduce([pt[i] for pt in partials], ranks=lambda n: [_drop_rank(n, p["ratio"])])
        return state


_STATS = PCBStats()


@register(
    "pcb",
    aliases=("pcb_merging", "pcb-merging"),
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 (arXiv 2410.02396)",
    math=(
        "T^c_i = sgn(T_i) clip(|T_i|); B_i = exp(N mm(|T^c_i|)^2) * tanh(T_i * sum_j T_j);\n"
        "B^_i = mm(max(B_i, quantile_{1-r}(B_i))); theta = theta_0 + lambda sum_i B^_i w_i T^c_i / sum_i B^_i\n"
        "(quantiles, min/max per task over the whole model with scope=global)"
    ),
    base="required",
    granularity="global",
    min_models=2,
    params=(
        Param("ratio", float, 0.1, help="kept fraction r of the PCB scores (paper: 0.05-0.2)"),
        Param("lambda", float, 1.0, help="scale of the merged task vector (paper: tuned 0.8-2.2; vision 1.2)"),
        Param("weight", float, 1.0, scope="model", help="per-task coefficient on T^c_i (vision code / ES variant)"),
        Param("clip", float, 1e-4, help="outlier clip fraction on each side (NLP 1e-4, vision 1e-2)"),
        Param("intra_temperature", float, None, help="factor inside exp() of intra-balancing; default N"),
        Param("inter", str, "nlp", choices=("nlp", "vision"), help="inter-balancing variant"),
        Param("scope", str, "global", choices=("global", "tensor"), help="statistics over the whole model or per tensor"),
    ),
    stats=lambda p: _STATS if p.get("scope", "global") == "global" else None,
    # global scope: per element given the whole-model statistics, so big tensors stream in row chunks
    # (statistics and apply); tensor scope needs the whole tensor's order statistics
    chunkable=lambda p, name="", shape=(): p.get("scope", "global") == "global",
    mergekit="not in mergekit; scope=tensor is the per-tensor port some toolkits use.",
    notes="Global scope reads the inputs 4 extra times (exact streamed quantiles); memory stays bounded.",
    example={"ratio": 0.2, "lambda": 1.0},
)
def pcb(ctx, base, models, p):
    _check(p)
    T = torch.stack(task_vectors(base, models))
    if T[0].numel() == 0:
        return base.clone()
    if p["scope"] == "global":
        st = ctx.stats
        if st is None:
            raise MergeError("pcb: scope=global needs the statistics pass (run through the engine or merge_tensors)")
        lo, hi = _STATS.bounds(st)
        thr = [s.value(next(iter(s.ranks))) for s in st["drop"]]
        return _combine(base, T, lo, hi, thr, st["bmax"], p)
    return _combine(base, T, *_tensor_stats(T, p), p)
