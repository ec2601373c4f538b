"""Task-vector diagnostics against a straightforward reference over the flattened model."""
from __future__ import annotations

import math
import re

import pytest
import torch

from mergesmith.bench import inspect as insp
from mergesmith.bench.report import write_inspect_report
from mergesmith.methods.base import MergeError

SHAPES = {"model.embed.weight": (7, 5), "model.layers.0.w.weight": (6, 4), "model.layers.0.w.bias": (6,),
          "model.layers.1.w.weight": (5, 5), "model.norm.weight": (5,), "model.scale": ()}


def _models(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["model.count"] = torch.tensor([3])  # integer tensors are ignored
    models = []
    for i in range(n):
        m = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        m["model.layers.1.w.weight"][0, :] = base["model.layers.1.w.weight"][0, :]  # some exact zeros in tau
        models.append(m)
    return base, models


def _reference(base, models, density, lam):
    """Concatenate every float tensor's task vector; per-tensor top-k masks, as documented."""
    keys = [k for k in base if base[k].is_floating_point()]
    taus = [torch.cat([(m[k] - base[k]).reshape(-1) for k in keys]).double() for m in models]
    masks = []
    for m in models:
        parts = []
        for k in keys:
            t = (m[k] - base[k]).reshape(-1)
            kk = max(1, int(density * t.numel()))
            idx = torch.topk(t.abs(), kk).indices
            mk = torch.zeros(t.numel(), dtype=torch.bool)
            mk[idx] = True
            parts.append(mk & (t != 0))  # exact zeros never count as kept entries
        masks.append(torch.cat(parts))
    n = len(models)
    out = {"norm": [float(t.norm()) for t in taus], "cos": [[0.0] * n for _ in range(n)],
           "conf": [[0.0] * n for _ in range(n)], "conf_k": [[0.0] * n for _ in range(n)],
           "jac": [[0.0] * n for _ in range(n)]}
    for i in range(n):
        for j in range(n):
            out["cos"][i][j] = float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
            both = (taus[i] != 0) & (taus[j] != 0)
            out["conf"][i][j] = float(((taus[i] * taus[j] < 0) & both).sum() / both.sum())
            bk = masks[i] & masks[j]
            out["conf_k"][i][j] = float(((taus[i] * taus[j] < 0) & bk).sum() / bk.sum()) if bk.any() else math.nan
            out["jac"][i][j] = float(bk.sum() / (masks[i] | masks[j]).sum())
    total = sum(taus)
    used = sum((taus[t].abs() > lam * (total - taus[t]).abs()).long() for t in range(n))
    out["tall"] = [int((used == c).sum()) for c in range(n + 1)]
    kept = [taus[i] * masks[i] for i in range(n)]
    pos = sum((k > 0).long() for k in kept)
    neg = sum((k < 0).long() for k in kept)
    several = pos + neg >= 2
    out["any"] = float((several & (pos > 0) & (neg > 0)).sum() / several.sum())
    out["base_norm"] = float(torch.cat([base[k].reshape(-1) for k in keys]).double().norm())
    return out


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, list):
            _close(x, y)
        elif math.isnan(y):
            assert math.isnan(x)
        else:
            assert x == pytest.approx(y, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_matches_reference(density):
    base, models = _models()
    res = insp.inspect_models(models, base, density=density, tall_lambda=0.5, labels=["a", "b", "c"])
    ref = _reference(base, models, density, 0.5)
    o = res["overall"]
    _close(o["norm"], ref["norm"])
    _close(o["cosine"], ref["cos"])
    _close(o["sign_conflict"], ref["conf"])
    _close(o["sign_conflict_topk"], ref["conf_k"])
    _close(o["topk_overlap"], ref["jac"])
    _close(o["relative_norm"], [v / ref["base_norm"] for v in ref["norm"]])
    assert res["tall_histogram"] == ref["tall"]
    assert res["sign_conflict_any_topk"] == pytest.approx(ref["any"])
    assert res["tensors"] == len(SHAPES) and res["parameters"] == sum(math.prod(s) for s in SHAPES.values())
    assert list(res["layers"]) == ["model.embed", "layer 0", "layer 1", "model.norm", "model.scale"]
    assert res["layers"]["layer 0"]["numel"] == 6 * 4 + 6


def test_identical_and_opposite_task_vectors():
    base, (m, _, _) = _models()
    neg = {k: 2 * base[k] - v if v.is_floating_point() else v for k, v in m.items()}
    res = insp.inspect_models([m, m, neg], base, density=0.5)
    cos = res["overall"]["cosine"]
    assert cos[0][1] == pytest.approx(1.0) and cos[0][2] == pytest.approx(-1.0)
    conf = res["overall"]["sign_conflict"]
    assert conf[0][1] == 0.0 and conf[0][2] == 1.0
    assert res["overall"]["topk_overlap"][0][2] == pytest.approx(1.0)


def test_row_chunks_give_the_same_statistics(monkeypatch):
    base, models = _models(seed=3)
    whole = insp.inspect_models(models, base, density=1.0)
    monkeypatch.setattr(insp, "CHUNK_ELEMS", 6)  # forces chunks of 1-2 rows
    chunked = insp.inspect_models(models, base, density=1.0)
    for key in ("norm", "cosine", "sign_conflict", "topk_overlap"):
        _close(chunked["overall"][key], whole["overall"][key])
    assert chunked["tall_histogram"] == whole["tall_histogram"]


def test_mismatched_tensors_are_skipped_and_reported():
    base, models = _models()
    models[1] = dict(models[1])
    models[1]["model.norm.weight"] = torch.zeros(9)
    del models[2]["model.scale"]
    res = insp.inspect_models(models, base)
    assert res["tensors"] == len(SHAPES) - 2 and len(res["skipped"]) == 2
    with pytest.raises(MergeError, match="density"):
        insp.inspect_models(models, base, density=0)
    with pytest.raises(MergeError, match="at least one"):
        insp.inspect_models([], base)
    with pytest.raises(MergeError, match="labels"):
        insp.inspect_models(models, base, labels=["x"])


def test_report_files_and_html_images(tmp_path):
    base, models = _models()
    res = insp.inspect_models(models, base, labels=["a", "b", "c"])
    files = write_inspect_report(res, tmp_path / "rep")
    for p in files.values():
        assert p.exists() and p.stat().st_size > 0
    html = (tmp_path / "rep" / "index.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", html)
    assert {"norms.png", "cosine.png", "sign_conflict.png", "topk_overlap.png"} <= set(srcs)
    assert all((tmp_path / "rep" / s).exists() for s in srcs)
    assert "http" not in html and "<script" not in html  # self-contained
