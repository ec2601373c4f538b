"""Test helper for tests/test_methods_spherical.py and tests/test_methods_mergekit_family.py.

``run`` resolves parameters and calls a registered method's function on one tensor, like
``api.merge_tensors`` but without its layer-position argument ``t`` (which would capture slerp's and
nearswap's own ``t`` parameter)."""
from __future__ import annotations

import math

import torch

from mergesmith.methods.base import TensorContext, get_method
from mergesmith.recipe import resolve_params


def run(method, models, base=None, *, name="model.layers.0.mlp.up_proj.weight", seed=0, **params):
    spec = get_method(method)
    n = len(models)
    glob, per = {}, [dict() for _ in range(n)]
    for k, v in params.items():
        p = spec.param(k)
        if p is not None and p.scope == "model" and isinstance(v, (list, tuple)):
            for i in range(n):
                per[i][k] = v[i]
        else:
            glob[k] = v
    p = resolve_params(spec, name, 0.0, [glob], [[d] for d in per])
    ctx = TensorContext(name=name, seed=seed, shape=tuple(models[0].shape))
    dtype = (base if base is not None else models[0]).dtype
    b = base.to(torch.float32) if base is not None else None
    return spec.fn(ctx, b, [m.to(torch.float32) for m in models], p).to(dtype)


def run_streamed(method, models, base=None, *, rows=2, name="model.layers.0.mlp.up_proj.weight", seed=0, **params):
    """Like ``run``, but the way the engine streams a tensor too big to hold whole: every sums phase
    (MethodSpec.sums) over row chunks of ``rows`` rows, then the method on each chunk with ctx.sums."""
    spec = get_method(method)
    glob = {k: v for k, v in params.items()}
    p = resolve_params(spec, name, 0.0, [glob], [[{}] for _ in models])
    n = models[0].shape[0]
    chunks = [(c, (a, min(a + rows, n))) for c, a in enumerate(range(0, n, rows))]

    def ctx(c, r, sums, phase=0):
        return TensorContext(name=name, seed=seed, shape=tuple(models[0].shape), chunk=c, rows=r, sums=sums,
                             phase=phase, owned=True)

    def part(x, r):
        return x[r[0]:r[1]].to(torch.float32).clone()

    result = None
    for k in range(spec.phases(p)):
        total = None
        for c, r in chunks:
            b = part(base, r) if base is not None else None
            piece = spec.sums(ctx(c, r, result, k), b, [part(m, r) for m in models], p)
            total = piece if total is None else total + piece
        result = spec.finish(k, result, total, p)
    outs = [spec.fn(ctx(c, r, result), part(base, r) if base is not None else None, [part(m, r) for m in models], p)
            for c, r in chunks]
    return torch.cat(outs).to((base if base is not None else models[0]).dtype)


def ref_slerp(t, a, b, threshold=0.9995):
    """Textbook slerp in float64 on the flattened tensors (angle formula, lerp when |cos| > threshold)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(x @ y) / (float(x.norm()) * float(y.norm()))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > threshold:
        out = (1 - t) * x + t * y
    else:
        om = math.acos(cos)
        out = math.sin((1 - t) * om) / math.sin(om) * x + math.sin(t * om) / math.sin(om) * y
    return out.reshape(a.shape)


def randn(*shape, seed=0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
