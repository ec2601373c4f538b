"""Task-vector diagnostics without merging: the interference picture of TIES and TALL masks.

For task vectors tau_i = theta_i - theta_0, streamed one tensor at a time (row chunks for very large
tensors), so memory is bounded by one tensor per model, never by model size:

* norms: ||tau_i|| per layer and overall, and the relative norm ||tau_i|| / ||theta_0||;
* cosine similarity: <tau_i, tau_j> / (||tau_i|| ||tau_j||), overall and per layer (mean over pairs);
* sign conflicts (Yadav et al., TIES-Merging, NeurIPS 2023): for each pair, the share of coordinates
  where both are non-zero and the signs differ, over all entries and within the top-k trimmed entries
  (top ``density`` of |tau_i| per tensor, exact zeros never count as kept); and, as in the paper's
  figure, the share of coordinates with >= 2 trimmed non-zero entries whose signs are not all equal;
* top-k overlap: Jaccard index |m_i & m_j| / |m_i | m_j| of the per-tensor top-k masks;
* TALL-mask consensus (Wang et al., ICML 2024): m_t = 1[|tau_t| > lambda |sum_j tau_j - tau_t|];
  histogram of how many tasks use each coordinate (0 = "catastrophic", 1 = "selfish").

All accumulators are O(N^2) numbers per layer; tensors are dropped as soon as they are counted.
Tensors larger than ``CHUNK_ELEMS`` elements are read in row chunks; their top-k is then taken per chunk.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..io.checkpoint import open_checkpoint
from ..layers import layer_index
from ..methods.base import MergeError
from ..methods.kernels import topk_mask

CHUNK_ELEMS = 1 << 22  # rows of larger tensors are streamed in chunks of about this many elements
# (0/1/sign counts use float32 matrix products: exact below 2**24 elements per chunk)


def group_of(name: str) -> str:
    i = layer_index(name)
    if i is not None:
        return f"layer {i}"
    return re.sub(r"\.(weight|bias)$", "", name)


def _group_order(groups: list[str]) -> list[str]:
    def key(g: str):
        if g.startswith("layer "):
            return (1, int(g.split()[1]), g)
        early = any(s in g for s in ("embed", "wte", "wpe", "tok"))
        return (0 if early else 2, 0, g)

    return sorted(groups, key=key)


def _labels(refs: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(refs):
            raise MergeError(f"--labels gives {len(labels)} names for {len(refs)} models")
        return list(labels)
    out = []
    for i, r in enumerate(refs):
        name = Path(str(r)).name if isinstance(r, (str, Path)) else f"model_{i}"
        out.append(name if name not in out else f"{name}_{i}")
    return out


class _Acc:
    """O(N^2) running sums for one group (a layer) or the whole model."""

    def __init__(self, n: int):
        z = lambda: torch.zeros(n, n, dtype=torch.float64)  # noqa: E731
        self.sumsq = torch.zeros(n, dtype=torch.float64)
        self.base_sumsq = 0.0
        self.dot, self.both, self.opp, self.both_k, self.opp_k = z(), z(), z(), z(), z()
        self.count_k = torch.zeros(n, dtype=torch.float64)
        self.numel = 0


def inspect_models(
    models: Sequence[Any],
    base: Any,
    *,
    density: float = 0.2,
    tall_lambda: float = 0.5,
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Diagnostics of the task vectors of ``models`` (paths, state dicts or modules) against ``base``."""
    if not models:
        raise MergeError("inspect: give at least one model besides the base")
    if not 0 < density <= 1:
        raise MergeError(f"inspect: --density must be in (0, 1], got {density}")
    names = _labels(models, labels)
    base_ck = open_checkpoint(base, label="base")
    cks = [open_checkpoint(m, label=lab) for m, lab in zip(models, names)]
    n = len(cks)
    total = _Acc(n)
    groups: dict[str, _Acc] = {}
    tall_hist = torch.zeros(n + 1, dtype=torch.float64)
    multi = conflict = 0.0
    skipped: list[str] = []
    tensors = 0
    keys = base_ck.keys()
    for step, name in enumerate(keys):
        meta = base_ck.meta(name)
        if not meta.dtype.is_floating_point:
            continue
        bad = next((c.label for c in cks if name not in c or c.meta(name).shape != meta.shape), None)
        if bad is not None:
            skipped.append(f"{name} (missing or different shape in {bad})")
            continue
        shape = meta.shape
        rows = shape[0] if len(shape) >= 2 else 1
        per_row = max(1, meta.numel // max(1, rows))
        step_rows = max(1, CHUNK_ELEMS // per_row) if len(shape) >= 2 else 1
        acc = groups.setdefault(group_of(name), _Acc(n))
        for r0 in range(0, rows, step_rows):
            span = (r0, min(rows, r0 + step_rows)) if len(shape) >= 2 else None
            b = base_ck.get(name, span).to(torch.float32).reshape(-1)
            taus = torch.stack([c.get(name, span).to(torch.float32).reshape(-1) - b for c in cks])
            trimmed = torch.stack([t * topk_mask(t, density) for t in taus])
            for a in (acc, total):
                _accumulate(a, b, taus, trimmed)
            if n >= 2:
                pos = (trimmed > 0).sum(0)
                neg = (trimmed < 0).sum(0)
                several = (pos + neg) >= 2
                multi += float(several.sum())
                conflict += float((several & (pos > 0) & (neg > 0)).sum())
                tsum = taus.sum(0)
                used = (taus.abs() > tall_lambda * (tsum.unsqueeze(0) - taus).abs()).sum(0)
                tall_hist += torch.bincount(used, minlength=n + 1).to(torch.float64)
            del b, taus, trimmed
        tensors += 1
        if progress:
            progress(step + 1, len(keys))
    for c in (base_ck, *cks):
        c.close()
    if tensors == 0:
        raise MergeError("inspect: no floating-point tensor is shared by the base and every model (same name and shape)")
    order = _group_order(list(groups))
    result = {
        "models": names, "base": str(base) if isinstance(base, (str, Path)) else "base", "density": density,
        "tall_lambda": tall_lambda, "tensors": tensors, "parameters": total.numel, "skipped": skipped,
        "overall": _summary(total),
        "layers": {g: _summary(groups[g]) for g in order},
        "sign_conflict_any_topk": conflict / multi if multi else float("nan"),
        "tall_histogram": [int(v) for v in tall_hist.tolist()] if n >= 2 else None,
    }
    if log and skipped:
        log(f"skipped {len(skipped)} tensor(s), e.g. {skipped[0]}")
    return result


def _accumulate(a: _Acc, b: torch.Tensor, taus: torch.Tensor, trimmed: torch.Tensor) -> None:
    t64 = taus.to(torch.float64)
    a.sumsq += (t64 * t64).sum(1)
    a.base_sumsq += float((b.to(torch.float64) ** 2).sum())
    a.dot += t64 @ t64.T
    del t64
    nz = (taus != 0).to(torch.float32)
    sgn = torch.sign(taus)
    both = (nz @ nz.T).to(torch.float64)
    a.both += both
    a.opp += (both - (sgn @ sgn.T).to(torch.float64)) / 2  # sum of (1 - s_i s_j) / 2 where both non-zero
    del nz, sgn
    kept = (trimmed != 0).to(torch.float32)
    both_k = (kept @ kept.T).to(torch.float64)
    ks = torch.sign(trimmed)
    a.both_k += both_k
    a.opp_k += (both_k - (ks @ ks.T).to(torch.float64)) / 2
    a.count_k += kept.sum(1).to(torch.float64)
    a.numel += b.numel()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[list[float]]:
    out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    return [[float(v) for v in row] for row in out]


def _summary(a: _Acc) -> dict[str, Any]:
    norms = a.sumsq.sqrt()
    cos = _ratio(a.dot, torch.outer(norms, norms))
    n = len(norms)
    pairs = [cos[i][j] for i in range(n) for j in range(i + 1, n) if not math.isnan(cos[i][j])]
    union = a.count_k.unsqueeze(0) + a.count_k.unsqueeze(1) - a.both_k
    base_norm = math.sqrt(a.base_sumsq)
    return {
        "numel": a.numel,
        "norm": [float(v) for v in norms],
        "relative_norm": [float(v) / base_norm if base_norm > 0 else float("nan") for v in norms],
        "cosine": cos,
        "mean_pairwise_cosine": sum(pairs) / len(pairs) if pairs else float("nan"),
        "sign_conflict": _ratio(a.opp, a.both),
        "sign_conflict_topk": _ratio(a.opp_k, a.both_k),
        "topk_overlap": _ratio(a.both_k, union),
    }
