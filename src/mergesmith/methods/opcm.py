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


def _chain(ctx, base, models, p):
    dev = ctx.device
    b = base.to(dev)
    taus = [m.to(dev) - b for m in _ordered(models, p, ctx.seed)]
    return taus, O.chain(ctx.name, taus, p["alpha"], p["zero_full_diagonal"])


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


class OPCMStats(GlobalStats):
    """One pass: per model ||tau_i||^2 and ||D^(N)||^2, summed over every tensor; D^(N) of each projected
    matrix is kept in a scratch folder for the apply pass."""

    def init(self, params, num_models):
        return {"tau_sq": [0.0] * num_models, "d_sq": 0.0, "scratch": _Scratch()}

    def collect(self, pass_index, state, ctx, base, models, p):
        taus, d = _chain(ctx, base, models, p)
        if len(models) > 1 and O.is_projected(ctx.name, ctx.shape or tuple(base.shape)):
            state["scratch"].put(ctx.name, ctx.chunk, d)
        return {"tau_sq": [O.sq_norm(t) for t in taus], "d_sq": O.sq_norm(d)}

    def reduce(self, pass_index, state, partials):
        tau_sq = list(state["tau_sq"])
        d_sq = state["d_sq"]
        for part in partials:
            if part is None:
                continue
            tau_sq = [a + b for a, b in zip(tau_sq, part["tau_sq"])]
            d_sq += part["d_sq"]
        return {"tau_sq": tau_sq, "d_sq": d_sq, "scratch": state["scratch"]}


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
    # of the whole-model norms depends on the chunking (relative ~1e-16 in the scale factor).
    chunkable=lambda p, name, shape: not O.is_projected(name, shape),
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
    d = st["scratch"].get(ctx.name, ctx.chunk) if st.get("scratch") is not None else None
    if d is None:
        _, d = _chain(ctx, base, models, p)
    d = d.to(ctx.device)
    factor = O.scale([O.norm(x) for x in st["tau_sq"]], O.norm(st["d_sq"]))
    b = base.to(d.device)
    return (b + d * factor).to(base.device)
