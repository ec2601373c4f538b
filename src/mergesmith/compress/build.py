"""Compress N fine-tuned experts into one merged task vector plus N bit-packed masks.

method=tall (Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024, arXiv 2405.07813):
    vector = tau_MTL (the unscaled task vector of a base merge: sum_i tau_i by default, any registered
             base merge with ``merge=``, e.g. ties), mask_t = [|tau_t| >= lambda_t |tau_MTL - tau_t|],
    expert t = theta_0 + mask_t * tau_MTL                (coefficient 1, as in the paper)
method=emr (Huang et al., "EMR-Merging", NeurIPS 2024, arXiv 2405.17461):
    vector = tau_uni, mask_t = M_t, expert t = theta_0 + lambda_t * M_t * tau_uni

Inputs are opened lazily and streamed tensor by tensor (a merge with a statistics pass, e.g. global
TIES, streams them once more per pass): memory is a few tensors per expert, never a model.
Storage is P floats + N*P bits instead of N*P floats.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..methods.base import MergeError, TensorContext
from .storage import DTYPES, FORMAT, MANIFEST, MASK_DIR, VECTOR_DIR, dtype_name, folder_bytes, pack_masks, packed_size

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nbytes(meta) -> int:
    return meta.numel * torch.empty((), dtype=meta.dtype).element_size()


def _labels(experts, names) -> list[str]:
    if names is None:
        out = []
        for i, e in enumerate(experts):
            n = Path(str(e)).name if isinstance(e, (str, os.PathLike)) else f"task{i}"
            out.append(n if n and n not in out else f"task{i}")
        return out
    names = [str(n) for n in names]
    if len(names) != len(experts):
        raise MergeError(f"got {len(names)} names for {len(experts)} experts")
    if len(set(names)) != len(names):
        raise MergeError("task names must be unique")
    return names


def _check_inputs(base, experts) -> list[str]:
    """Names of the base's tensors; every expert must have exactly those, with the same shapes."""
    names = base.keys()
    for e in experts:
        for n in names:
            if n not in e:
                raise MergeError(f"expert {e.label} has no tensor {n} (all experts must share the base's architecture)")
            if e.meta(n).shape != base.meta(n).shape:
                raise MergeError(f"{n}: shape {e.meta(n).shape} in {e.label} differs from the base's {base.meta(n).shape}")
        extra = [n for n in e.keys() if n not in base]
        if extra:
            raise MergeError(f"expert {e.label} has tensor {extra[0]} that the base lacks")
    return names


class _TallDelta:
    """The base merge's unscaled task vector for one tensor, with its statistics pass if any."""

    def __init__(self, merge: str, params: dict, n: int, names: list[str], num_layers, seed: int):
        from ..api import method_params
        from ..layers import layer_index
        from ..methods.base import get_method

        self.spec = get_method(merge)
        if self.spec.base == "none":
            raise MergeError(f"--merge {merge}: the TALL vector needs a base merge that uses the base model (e.g. task_arithmetic, ties)")
        self.params, self.n, self.seed, self.L = dict(params), n, seed, num_layers
        self.layer = {name: layer_index(name) for name in names}
        self._resolve = method_params
        self.stats = None
        self.resolve(names[0] if names else "tensor")  # unknown / bad parameters fail here, before any read

    def resolve(self, name: str):
        layer, L = self.layer.get(name), self.L
        t = 0.0 if layer is None or L is None else (1.0 if L <= 1 else layer / (L - 1))
        return self._resolve(self.spec.name, self.n, name=name, layer_t=t, **self.params)

    def ctx(self, name: str, shape) -> TensorContext:
        return TensorContext(name=name, layer=self.layer.get(name), num_layers=self.L, seed=self.seed,
                             stats=self.stats, shape=tuple(shape))

    def statistics(self, names: list[str], load) -> None:
        if not names:
            return
        from ..engine import run_statistics

        def items(stride: int = 0):  # in memory: sampled passes simply see every row
            for name in names:
                b, ms = load(name)
                yield self.ctx(name, b.shape), b, ms, self.resolve(name)

        self.stats = run_statistics(self.spec, self.resolve(names[0]), items, self.n)

    def __call__(self, name: str, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
        return self.spec.fn(self.ctx(name, base.shape), base, models, self.resolve(name)) - base


def compress_experts(
    base: Any,
    experts: Sequence[Any],
    out: str | Path,
    *,
    method: str = "tall",
    names: Sequence[str] | None = None,
    mask_lambda: float | Sequence[float] = 0.5,
    strict: bool = False,
    merge: str = "task_arithmetic",
    merge_params: dict | None = None,
    rescale: str = "paper",
    dtype: str | None = None,
    seed: int = 0,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> dict:
    """Write the compressed set of ``experts`` (paths, state dicts or modules) to the folder ``out``.

    Returns a report: bytes of the experts, of the artefact, saved, and per task the mask density and
    the relative reconstruction error ||theta^_t - theta_t|| / ||theta_t - theta_0|| over merged tensors.
    """
    from ..io.checkpoint import open_checkpoint
    from ..io.writer import ShardedWriter, parse_size
    from ..methods.emr import emr_elect, emr_rescale_terms, emr_scales
    from ..methods.kernels import tall_masks
    from ..plan import num_layers_of
    from ..io.atomic import check_output_dir, replace_dir as _replace

    # -- checks, headers only ----------------------------------------------------------------------
    if method not in ("tall", "emr"):
        raise MergeError(f"unknown compression method {method!r}; use tall or emr")
    if not experts:
        raise MergeError("give at least one expert to compress")
    if rescale not in ("paper", "code"):
        raise MergeError(f"rescale must be paper or code, got {rescale!r}")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise MergeError(str(e)) from None
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    labels = _labels(experts, names)
    n = len(experts)
    lams = [float(x) for x in mask_lambda] if isinstance(mask_lambda, (list, tuple)) else [float(mask_lambda)] * n
    if len(lams) != n:
        raise MergeError(f"got {len(lams)} mask_lambda values for {n} experts")
    if any(x < 0 for x in lams):
        raise MergeError("mask_lambda must be >= 0")
    b_ck = open_checkpoint(base, label="base")
    e_cks = [open_checkpoint(e, label=labels[i]) for i, e in enumerate(experts)]
    all_names = _check_inputs(b_ck, e_cks)
    merged_names = [k for k in all_names if b_ck.meta(k).dtype in FLOATS and e_cks[0].meta(k).dtype in FLOATS]
    delta = None
    if method == "tall":
        delta = _TallDelta(merge, merge_params or {}, n, merged_names, num_layers_of(b_ck), seed)

    def load(name):
        b = b_ck.get(name).to(torch.float32)
        return b, [e.get(name).to(torch.float32) for e in e_cks]

    store = {k: (DTYPES[dtype] if dtype else e_cks[0].meta(k).dtype) for k in merged_names}
    tmp = out.parent / f".{out.name}.mergesmith-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / VECTOR_DIR).mkdir(parents=True)
    (tmp / MASK_DIR).mkdir()
    writers = []
    started = time.time()
    try:
        if delta is not None:
            delta.statistics(merged_names, load)
        vw = ShardedWriter(tmp / VECTOR_DIR, {k: (b_ck.meta(k).shape, store[k]) for k in merged_names}, size)
        writers.append(vw)
        mw = ShardedWriter(tmp / MASK_DIR, {k: ((n, packed_size(b_ck.meta(k).numel)), torch.uint8) for k in merged_names}, size)
        writers.append(mw)
        ones = [0] * n
        total = 0
        sq = [[0.0, 0.0, 0.0] for _ in range(n)]  # sum (m u)^2, sum (m u) tau, sum tau^2
        num, den = [0.0] * n, [0.0] * n
        for name in merged_names:
            b, ms = load(name)
            d = torch.stack([m - b for m in ms])
            if method == "tall":
                vec = delta(name, b, ms)
                masks = tall_masks(d, vec, lams, strict)
            else:
                vec, masks = emr_elect(d)
            vec_stored = vec.to(store[name])
            u = vec_stored.to(torch.float32)
            if method == "emr":
                a, c = emr_rescale_terms(d, u, masks, rescale)
                num = [x + y for x, y in zip(num, a)]
                den = [x + y for x, y in zip(den, c)]
            vw.write(name, vec_stored)
            mw.write(name, pack_masks(masks))
            total += u.numel()
            for t in range(n):
                r = (masks[t] * u).to(torch.float64)
                tau = d[t].to(torch.float64)
                ones[t] += int(masks[t].sum())
                sq[t][0] += float((r * r).sum())
                sq[t][1] += float((r * tau).sum())
                sq[t][2] += float((tau * tau).sum())
        for w in writers:
            w.close()
        scales = emr_scales(num, den) if method == "emr" else [1.0] * n
        tasks = []
        for t in range(n):
            s, (aa, bb, cc) = scales[t], sq[t]
            err2 = max(s * s * aa - 2 * s * bb + cc, 0.0)
            tasks.append({
                "name": labels[t], "source": e_cks[t].label, "scale": s,
                "mask_lambda": lams[t] if method == "tall" else None,
                "mask_density": ones[t] / total if total else 0.0,
                "relative_error": (err2 / cc) ** 0.5 if cc > 0 else 0.0,
            })
        experts_bytes = sum(_nbytes(e.meta(k)) for e in e_cks for k in all_names)
        manifest = {
            "format": FORMAT, "method": method, "tasks": tasks,
            "base": {"source": str(Path(base).resolve()) if isinstance(base, (str, os.PathLike)) else None,
                     "identity": b_ck.identity()},
            "merge": merge if method == "tall" else None,
            "merge_params": dict(merge_params or {}) if method == "tall" else None,
            "strict": strict if method == "tall" else None,
            "rescale": rescale if method == "emr" else None,
            "seed": seed,
            "tensors": {k: {"shape": list(b_ck.meta(k).shape), "dtype": dtype_name(e_cks[0].meta(k).dtype),
                            "merged": k in store, "stored_dtype": dtype_name(store[k]) if k in store else None}
                        for k in all_names},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        artefact_bytes = folder_bytes(tmp)
        report = {
            "method": method, "tasks": tasks, "experts_bytes": experts_bytes, "artefact_bytes": artefact_bytes,
            "saved_bytes": experts_bytes - artefact_bytes,
            "ratio": experts_bytes / artefact_bytes if artefact_bytes else float("inf"),
            "seconds": round(time.time() - started, 3),
        }
        manifest["report"] = {k: v for k, v in report.items() if k != "tasks"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        report["artefact_bytes"] = artefact_bytes = folder_bytes(tmp)  # now including the report itself
        report["saved_bytes"] = experts_bytes - artefact_bytes
        report["ratio"] = experts_bytes / artefact_bytes
        _replace(tmp, out, overwrite)
        return report
    except BaseException:
        for w in writers:
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
