"""OPCM over models given at once, in recipe order (the continual method as a one-shot merge).

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging", arXiv 2501.09522 (NeurIPS 2025).  Math and deviations: :mod:`mergesmith.continual.opcm`
(one implementation, shared with ``mergesmith continual``).

    D^(1) = tau_1 ;  D^(t) = D^(t-1) + proj_{D^(t-1)}(tau_t)   (2-D linear weights; else + tau_t)
    theta = theta_0 + D^(N) * mean_i ||tau_i|| / ||D^(N)||      (norms over the whole model)

The two whole-model norms come from a statistics pass that runs the per-tensor chain once; it keeps each
tensor's D^(N) (float32) in a scratch folder so the apply pass only rescales it (the SVDs run once, as in
``mergesmith continual``). The scratch folder (4 bytes per merged parameter, under ``$MERGESMITH_SCRATCH``
or the system temp dir) is deleted when the merge's statistics are released. In-memory merges without a
statistics pass recompute the chain. The result depends on the order of the models (``shuffle_order``
draws one order from the seed, the same for every tensor).

Large tall matrices (a vocab x hidden lm_head: rows >= GRAM_ASPECT * columns and >= CHUNK_MIN_ELEMENTS
elements) stream in row chunks like the element-wise tensors: the statistics pass sums the pairwise Grams
tau_i^T tau_j over the chunks and, at the last chunk, runs the chain on n x n matrices (the coefficient
route of :mod:`mergesmith.continual.opcm`), keeping D^(N) = sum_i tau_i C_i as the coefficients C_i; the
apply pass forms D^(N) chunk by chunk. The engine's inputs are this merge's own copies (``ctx.owned``):
the task vectors are formed and projected in place.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch

from ..continual import opcm as O
from .base import GlobalStats, Param, register


def _ordered(models, p, seed: int):
    if p["shuffle_order"] and len(models) > 1:
        return [models[i] for i in O.permutation(len(models), seed)]
    return list(models)


def _task_vectors(ctx, base, models, p) -> list:
    """tau_i = theta_i - theta_0 in merge order; in place when the engine's tensors are ours (``ctx.owned``)."""
    dev = ctx.device
    b = base.to(dev)
    own = ctx.owned and dev == base.device
    return [m.sub_(b) if own and m.device == b.device else m.to(dev) - b for m in _ordered(models, p, ctx.seed)]


def _chain(ctx, base, models, p):
    """(||tau_i||^2 per model, D^(N)) of one whole tensor; D is formed in the task vectors' buffers."""
    taus = _task_vectors(ctx, base, models, p)
    tau_sq = [O.sq_norm(t) for t in taus]
    return tau_sq, O.chain(ctx.name, taus, p["alpha"], p["zero_full_diagonal"], inplace=True)


def chunked(shape) -> bool:
    """A projected matrix that the one-shot method streams in row chunks (coefficient route): tall (rows >=
    GRAM_ASPECT * columns) and at least CHUNK_MIN_ELEMENTS elements, e.g. a vocab x hidden lm_head."""
    return (len(shape) == 2 and shape[1] >= 1 and shape[0] >= O.GRAM_ASPECT * shape[1]
            and shape[0] * shape[1] >= O.CHUNK_MIN_ELEMENTS)


def _chunkable(p, name, shape) -> bool:
    return not O.is_projected(name, shape) or chunked(shape)


def _is_chunk(ctx, base) -> bool:
    """True for a row chunk of a chunked projected matrix (not the whole tensor)."""
    return bool(ctx.shape) and tuple(base.shape) != tuple(ctx.shape) and O.is_projected(ctx.name, ctx.shape)


class _Scratch:
    """A temporary folder of per-(tensor, chunk) float32 results, removed with the object."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="mergesmith-opcm-", dir=os.environ.get("MERGESMITH_SCRATCH"))

    def _path(self, name: str, chunk: int) -> str:
        key = hashlib.sha256(f"{name}|{chunk}".encode()).hexdigest()[:32]
        return os.path.join(self._dir.name, key + ".safetensors")

    def put(self, name: str, chunk: int, x: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"d": x.detach().to("cpu", torch.float32).contiguous()}, self._path(name, chunk))

    def get(self, name: str, chunk: int) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(name, chunk)
        return load_file(path)["d"] if os.path.exists(path) else None

    def put_coefficients(self, name: str, C: list) -> None:
        """The coefficient route's C_i (float64; None = identity) of one tensor."""
        from safetensors.torch import save_file

        save_file({str(i): c.detach().cpu().contiguous() for i, c in enumerate(C) if c is not None} | {
            "n": torch.tensor(len(C))}, self._path(name, -1))

    def get_coefficients(self, name: str) -> list | None:
        from safetensors.torch import load_file

        path = self._path(name, -1)
        if not os.path.exists(path):
            return None
        d = load_file(path)
        return [d.get(str(i)) for i in range(int(d["n"]))]


class OPCMStats(GlobalStats):
    """One pass: per model ||tau_i||^2 and ||D^(N)||^2, summed over every tensor; D^(N) of each projected
    matrix (or, for row-chunked ones, its coefficients C_i) is kept in a scratch folder for the apply pass.
    While a chunked matrix streams, its pairwise Grams (float64, N(N+1)/2 of n x n) live in the state."""

    def init(self, params, num_models):
        return {"tau_sq": [0.0] * num_models, "d_sq": 0.0, "scratch": _Scratch(), "grams": {}}

    def collect(self, pass_index, state, ctx, base, models, p):
        if len(models) > 1 and _is_chunk(ctx, base):
            return self._collect_chunk(state, ctx, base, models, p)
        tau_sq, d = _chain(ctx, base, models, p)
        if len(models) > 1 and O.is_projected(ctx.name, ctx.shape or tuple(base.shape)):
            state["scratch"].put(ctx.name, ctx.chunk, d)
        return {"tau_sq": tau_sq, "d_sq": O.sq_norm(d)}

    def _collect_chunk(self, state, ctx, base, models, p):
        """Sum this chunk's pairwise Grams; after the last row, run the coefficient chain."""
        taus = _task_vectors(ctx, base, models, p)
        acc = state["grams"].setdefault(ctx.name, {"rows": 0, "g": {}})
        O.pairwise_grams(taus, acc["g"])
        acc["rows"] += taus[0].shape[0]
        out = {"tau_sq": [O.sq_norm(t) for t in taus], "d_sq": 0.0}
        del taus
        if acc["rows"] >= ctx.shape[0]:
            del state["grams"][ctx.name]
            C, out["d_sq"] = O.coefficient_chain(acc["g"], len(models), p["alpha"], p["zero_full_diagonal"])
            state["scratch"].put_coefficients(ctx.name, C)
        return out

    def reduce(self, pass_index, state, partials):
        tau_sq = list(state["tau_sq"])
        d_sq = state["d_sq"]
        for part in partials:
            if part is None:
                continue
            tau_sq = [a + b for a, b in zip(tau_sq, part["tau_sq"])]
            d_sq += part["d_sq"]
        return {"tau_sq": tau_sq, "d_sq": d_sq, "scratch": state["scratch"], "grams": {}}


@register(
    "opcm",
    aliases=("orthogonal_projection_continual_merging",),
    paper="Tang et al., Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable "
          "Continual Model Merging, arXiv 2501.09522 (NeurIPS 2025)",
    math="in model order: D = tau_1; D += tau_t minus its part in D's top-alpha singular block and on D's "
         "singular pairs (2-D weights); theta = theta_0 + D * mean_i ||tau_i|| / ||D|| (whole-model norms)",
    base="required",
    granularity="spectral",
    params=(
        Param("alpha", float, 0.5, help="fraction of the sum of singular values whose block is protected"),
        Param("zero_full_diagonal", bool, True,
              help="also drop every P[j,j] (FusionBench fix); false = paper-release behaviour"),
        Param("shuffle_order", bool, False,
              help="merge in an order drawn from the seed (official default true) instead of recipe order"),
    ),
    stats=OPCMStats(),
    # element-wise tensors (not projected: embeddings, norms, biases) stream in row chunks, as in
    # `mergesmith continual`; the statistics pass uses the same chunks. Only the float64 summation order
    # of the whole-model norms depends on the chunking (relative ~1e-16 in the scale factor). Large tall
    # projected matrices (lm_head) stream too, by the coefficient route (`chunked`).
    chunkable=_chunkable,
    mergekit="not in mergekit.",
    notes="order dependent: models are folded in recipe order (or a seeded shuffle); the statistics pass "
          "keeps D per matrix in a scratch folder (4 bytes/parameter, $MERGESMITH_SCRATCH). For models that arrive over time use `mergesmith continual` (one SVD per "
          "matrix per model, state folder of constant size).",
    example={"alpha": 0.5},
)
def opcm(ctx, base, models, p):
    if len(models) == 1:  # theta^(1) = theta_1 exactly
        return models[0].clone()
    st = ctx.stats
    if st is None:
        raise RuntimeError("opcm needs its statistics pass (ctx.stats)")
    factor = O.scale([O.norm(x) for x in st["tau_sq"]], O.norm(st["d_sq"]))
    b = base.to(ctx.device)
    if _is_chunk(ctx, base):
        d = O.combine(_task_vectors(ctx, base, models, p), _coefficients(st, ctx.name))
    else:
        d = st["scratch"].get(ctx.name, ctx.chunk) if st.get("scratch") is not None else None
        d = _chain(ctx, base, models, p)[1] if d is None else d.to(ctx.device)
    return d.mul_(factor).add_(b).to(base.device)  # = b + d * factor, in d's buffer


def _coefficients(st, name: str) -> list:
    """The coefficient route's C_i of ``name`` (cached in the statistics state for its chunks)."""
    cached = st.get("coef_cache")
    if cached is None or cached[0] != name:
        C = st["scratch"].get_coefficients(name)
        if C is None:
            raise RuntimeError(f"opcm: no coefficients for {name} (statistics pass missing)")
        st["coef_cache"] = cached = (name, C)
    return cached[1]
