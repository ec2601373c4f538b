#!/usr/bin/env python
"""mergekit parity check: run the same recipes with mergekit 0.1.5 and mergesmith, compare the tensors.

mergekit is never imported here and is not a project dependency: it is run as a subprocess from a
separate virtualenv (``--mergekit-bin``, default ``/work/mk-venv/bin/mergekit-yaml``). mergesmith runs
in this interpreter through :func:`mergesmith.run.run_recipe`.

The inputs are tiny random Llama models built locally with ``tests/conftest.py``'s ``write_zoo``
(float32, a base plus three fine-tune-like perturbations). For each case one mergekit YAML recipe is
written and run; the mergesmith recipe is the same YAML plus the parameters that select the method's
mergekit-compatible setting (the ``mergekit=`` note of ``mergesmith methods NAME``).

* deterministic methods: every output tensor is compared (max abs diff, max rel diff); PASS when the
  tensor sets are equal and max abs diff <= ``--tol`` (1e-5 by default, float32).
* stochastic methods (DARE, DELLA): the random masks cannot match (different RNGs), so statistics of a
  one-model merge are compared instead: kept fraction, kept fraction of the top and bottom magnitude
  halves of each row (DELLA's magnitude-ranked keep probabilities), mean rescale factor of the kept
  entries, the L1 ratio ||merged - base||_1 / ||tau||_1 over the model and its largest deviation from 1
  over single tensors (0 for mergekit's per-tensor L1-matching rescale, not for the paper's 1/p).

Usage::

    python benchmarks/mergekit_parity.py [--mergekit-bin PATH] [--only ties,slerp] [--markdown FILE]

Relative difference = max over elements of |a - b| / max(|b|, 1e-3 * max|b| of that tensor).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BIN = "/work/mk-venv/bin/mergekit-yaml"

# ---------------------------------------------------------------------------------------------------
# Cases. Model names are placeholders replaced by the zoo's folders: base, ft0, ft1, ft2.
# ``mk``: the mergekit recipe; ``ms``: top-level parameters added for mergesmith's mergekit mode;
# ``ms_recipe``: a full replacement recipe for mergesmith when the spelling differs.

ATTN_MLP_T = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]


def _models(*entries):
    return [{"model": m, "parameters": p} if p else {"model": m} for m, p in entries]


CASES: list[dict] = [
    dict(name="linear", mk={"merge_method": "linear",
                            "models": _models(("ft0", {"weight": 0.5}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.2}))}),
    dict(name="linear_unnormalized", mk={"merge_method": "linear", "parameters": {"normalize": False},
                                         "models": _models(("ft0", {"weight": 0.7}), ("ft1", {"weight": 0.6}))}),
    dict(name="linear_gradient_filter", mk={
        "merge_method": "linear",
        "models": _models(("ft0", {"weight": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                              {"filter": "mlp", "value": [1.0, 0.2]}, {"value": 0.3}]}),
                          ("ft1", {"weight": 0.5}))}),
    dict(name="task_arithmetic", mk={"merge_method": "task_arithmetic", "base_model": "base",
                                     "models": _models(("ft0", {"weight": 0.7}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": -0.2}))}),
    dict(name="task_arithmetic_gradient", mk={
        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8, "normalize": True},
        "models": _models(("ft0", {"weight": [1.0, 0.0]}), ("ft1", {"weight": [{"filter": "o_proj", "value": 2.0}, {"value": 0.5}]}))}),
    dict(name="slerp", mk={"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3},
                           "models": _models(("base", None), ("ft0", None))}),
    dict(name="slerp_gradient_filter", mk={"merge_method": "slerp", "base_model": "base", "parameters": {"t": ATTN_MLP_T},
                                           "models": _models(("base", None), ("ft0", None))}),
    dict(name="slerp_slices", mk={"merge_method": "slerp", "base_model": "base", "parameters": {"t": ATTN_MLP_T},
                                  "slices": [{"sources": [{"model": "base", "layer_range": [0, 3]},
                                                          {"model": "ft1", "layer_range": [0, 3]}]}]}),
    dict(name="nuslerp", mk={"merge_method": "nuslerp",
                             "models": _models(("ft0", {"weight": 0.4}), ("ft1", {"weight": 0.6}))}),
    dict(name="nuslerp_base_rowwise", mk={"merge_method": "nuslerp", "base_model": "base",
                                          "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                          "models": _models(("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7}))}),
    dict(name="nuslerp_base_vectors", mk={"merge_method": "nuslerp", "base_model": "base",
                                          "parameters": {"nuslerp_flatten": False},
                                          "models": _models(("ft0", {"weight": 0.5}), ("ft1", {"weight": 0.5}))}),
    dict(name="multislerp", mk={"merge_method": "multislerp",
                                "models": _models(("ft0", {"weight": 0.5}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.2}))}),
    dict(name="multislerp_base", mk={"merge_method": "multislerp", "base_model": "base",
                                     "models": _models(("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0}), ("ft2", {"weight": 1.0}))}),
    dict(name="karcher", mk={"merge_method": "karcher", "models": _models(("ft0", None), ("ft1", None), ("ft2", None))}),
    dict(name="karcher_base", mk={"merge_method": "karcher", "base_model": "base", "parameters": {"max_iter": 20},
                                  "models": _models(("ft0", None), ("ft1", None))}),
    dict(name="ties", mk={
        "merge_method": "ties", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": 0.5}), ("ft1", {"weight": 0.6, "density": 0.3}),
                          ("ft2", {"weight": 0.8, "density": 0.7}))}),
    dict(name="ties_unnormalized_lambda", mk={
        "merge_method": "ties", "base_model": "base", "parameters": {"normalize": False, "lambda": 0.7},
        "models": _models(("ft0", {"weight": 0.5, "density": 0.4}), ("ft1", {"weight": 0.5, "density": 0.4}))}),
    dict(name="ties_density_gradient", mk={
        "merge_method": "ties", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": [0.3, 0.9]}),
                          ("ft1", {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]}))}),
    # DARE with density 1 draws no mask: deterministic, checks DARE's combination step exactly
    dict(name="dare_ties_dense", mk={
        "merge_method": "dare_ties", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": 1.0}), ("ft1", {"weight": 0.5, "density": 1.0}),
                          ("ft2", {"weight": 0.8, "density": 1.0}))}),
    dict(name="dare_linear_dense", mk={
        "merge_method": "dare_linear", "base_model": "base", "parameters": {"normalize": True, "lambda": 0.9},
        "models": _models(("ft0", {"weight": 0.6, "density": 1.0}), ("ft1", {"weight": 0.4, "density": 1.0}))}),
    dict(name="breadcrumbs", mk={
        "merge_method": "breadcrumbs", "base_model": "base",
        "models": _models(("ft0", {"weight": 0.6, "density": 0.8, "gamma": 0.05}), ("ft1", {"weight": 0.4, "density": 0.9, "gamma": 0.01}))}),
    dict(name="breadcrumbs_ties", mk={
        "merge_method": "breadcrumbs_ties", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": 0.7, "gamma": 0.1}), ("ft1", {"weight": 1.0, "density": 0.7, "gamma": 0.1}),
                          ("ft2", {"weight": 0.5, "density": 0.9, "gamma": 0.02}))}),
    dict(name="model_stock", mk={"merge_method": "model_stock", "base_model": "base",
                                                      "models": _models(("ft0", None), ("ft1", None), ("ft2", None))}),
    dict(name="model_stock_filter_wise", mk={
        "merge_method": "model_stock", "base_model": "base", "parameters": {"filter_wise": True},
        "models": _models(("ft0", None), ("ft1", None))}),
    dict(name="nearswap", mk={"merge_method": "nearswap", "base_model": "base", "parameters": {"t": 0.01},
                              "models": _models(("ft0", None))}),
    dict(name="arcee_fusion", mk={"merge_method": "arcee_fusion", "base_model": "base", "models": _models(("ft0", None))}),
    dict(name="sce", mk={"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5},
                         "models": _models(("ft0", None), ("ft1", None), ("ft2", None))}),
    dict(name="sce_topk1", mk={"merge_method": "sce", "base_model": "base",
                               "models": _models(("ft0", None), ("ft1", None))}),
    dict(name="passthrough_slices", mk={
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "ft1", "layer_range": [1, 3]}]}]}),
    dict(name="passthrough_scale_filter", mk={
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 3]}]},
                   {"sources": [{"model": "ft2", "layer_range": [2, 3],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                          {"filter": "down_proj", "value": 0.25}, {"value": 1.0}]}}]}]}),
    # RAM: the zoo's task vectors are dense (std 0.02), so an epsilon near it makes changes unique or shared
    dict(name="ram", mk={"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": 0.02},
                         "models": _models(("ft0", None), ("ft1", None), ("ft2", None))}),
    dict(name="ram_default_epsilon", mk={"merge_method": "ram", "base_model": "base",
                                         "models": _models(("ft0", None), ("ft1", None))}),
    dict(name="ramplus_tl", mk={"merge_method": "ramplus_tl", "base_model": "base",
                                "parameters": {"epsilon": 0.03, "r": 0.5, "alpha": 1.0},
                                "models": _models(("ft0", None), ("ft1", None), ("ft2", None))}),
    dict(name="ramplus_tl_defaults", mk={"merge_method": "ramplus_tl", "base_model": "base", "parameters": {"epsilon": 0.02},
                                         "models": _models(("base", None), ("ft0", None), ("ft1", None))}),
    # mergekit's own defaults (``defaults: mergekit``): no density (1.0: TIES elects signs only, DELLA prunes
    # nothing), breadcrumbs' gamma 0.01, DELLA's normalize and lambda 1
    dict(name="ties_default_density", mk={
        "merge_method": "ties", "base_model": "base",
        "models": _models(("ft0", {"weight": 0.7}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.3}))}),
    dict(name="ties_base_listed", mk={  # model cards list the base among the models, without parameters
        "merge_method": "ties", "base_model": "base", "parameters": {"int8_mask": True},
        "models": _models(("base", None), ("ft0", {"weight": 0.5, "density": 0.5}), ("ft1", {"weight": 0.3, "density": 0.5}))}),
    dict(name="breadcrumbs_default_gamma", mk={
        "merge_method": "breadcrumbs", "base_model": "base",
        "models": _models(("ft0", {"weight": 0.6, "density": 0.8}), ("ft1", {"weight": 0.4, "density": 0.9}))}),
    dict(name="della_default_density", mk={
        "merge_method": "della", "base_model": "base",
        "models": _models(("ft0", {"weight": 0.8}), ("ft1", {"weight": 0.6}))}),
    # stochastic: one model, so merged - base = mask * tau * rescale can be read off
    dict(name="dare_linear", stochastic=True, mk={
        "merge_method": "dare_linear", "base_model": "base", "models": _models(("ft0", {"weight": 1.0, "density": 0.5}))}),
    dict(name="dare_ties", stochastic=True, mk={
        "merge_method": "dare_ties", "base_model": "base", "models": _models(("ft0", {"weight": 1.0, "density": 0.3}))}),
    dict(name="della", stochastic=True, mk={
        "merge_method": "della", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": 0.5, "epsilon": 0.2}))}),
    dict(name="della_linear", stochastic=True, mk={
        "merge_method": "della_linear", "base_model": "base",
        "models": _models(("ft0", {"weight": 1.0, "density": 0.4, "epsilon": 0.1}))}),
]


# ---------------------------------------------------------------------------------------------------
# helpers


def _subst(obj, paths: dict):
    """Replace placeholder model names (base, ft0, ...) by folder paths, recursively."""
    if isinstance(obj, dict):
        return {k: (str(paths[v]) if k in ("model", "base_model") and v in paths else _subst(v, paths)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_subst(v, paths) for v in obj]
    return obj


def mergesmith_recipe(case: dict, mergekit_defaults: bool = True) -> dict:
    """The mergekit recipe as it is, with ``defaults: mergekit`` (each method's ``mergekit_params``: mergekit's
    defaults and settings, ``mergesmith methods NAME``) unless the paper's defaults are compared."""
    if "ms_recipe" in case:
        return copy.deepcopy(case["ms_recipe"])
    rec = copy.deepcopy(case["mk"])
    if mergekit_defaults:
        rec["defaults"] = "mergekit"
    if case.get("ms"):
        rec.setdefault("parameters", {}).update(case["ms"])
    return rec


def load_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        out = {}
        for f in sorted(set(json.loads(idx.read_text())["weight_map"].values())):
            out.update(load_file(folder / f))
        return out
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def compare(a: dict, b: dict) -> dict:
    """a: mergesmith, b: mergekit. Max abs / rel diff over every common float tensor."""
    import torch

    ka, kb = set(a), set(b)
    res = {"n": len(ka & kb), "only_ms": sorted(ka - kb), "only_mk": sorted(kb - ka),
           "max_abs": 0.0, "max_rel": 0.0, "worst": None, "shape_mismatch": []}
    for k in sorted(ka & kb):
        x, y = a[k], b[k]
        if x.shape != y.shape:
            res["shape_mismatch"].append(k)
            continue
        if not torch.is_floating_point(y):
            d = float((x != y).any())
            if d > res["max_abs"]:
                res["max_abs"], res["worst"] = d, k
            continue
        x64, y64 = x.double(), y.double()
        diff = (x64 - y64).abs()
        if not torch.isfinite(diff).all():
            res["max_abs"], res["worst"] = float("inf"), k
            continue
        floor = max(1e-3 * float(y64.abs().max()), 1e-12)
        m = float(diff.max()) if diff.numel() else 0.0
        rel = float((diff / y64.abs().clamp_min(floor)).max()) if diff.numel() else 0.0
        if m > res["max_abs"]:
            res["max_abs"], res["worst"] = m, k
        res["max_rel"] = max(res["max_rel"], rel)
    return res


def dropout_stats(merged: dict, base: dict, ft: dict) -> dict:
    """Statistics of a one-model sparsified merge: merged - base = mask * tau * factor."""
    import torch

    kept = total = 0
    top_kept = top_n = bot_kept = bot_n = 0
    fac_sum = 0.0
    l1_out = l1_tau = 0.0
    dev = 0.0  # max over tensors of | ||merged - base||_1 / ||tau||_1 - 1 |: 0 for mergekit's L1 rescale
    for k, y in merged.items():
        if not torch.is_floating_point(y) or k not in base:
            continue
        b, f = base[k].double(), ft[k].double()
        tau = (f - b).reshape(-1, f.shape[-1]) if f.dim() >= 1 else (f - b).reshape(1, 1)
        d = (y.double() - b).reshape(tau.shape)
        nz = tau != 0
        keep = (d != 0) & nz
        kept += int(keep.sum())
        total += int(nz.sum())
        fac_sum += float((d[keep] / tau[keep]).sum())
        l1_out += float(d.abs().sum())
        l1_tau += float(tau.abs().sum())
        if bool(keep.any()) and float(tau.abs().sum()) > 0:
            dev = max(dev, abs(float(d.abs().sum()) / float(tau.abs().sum()) - 1.0))
        # keep rate of the top and bottom magnitude halves of each row
        if tau.shape[-1] >= 2:
            order = tau.abs().argsort(dim=-1)
            half = tau.shape[-1] // 2
            kept_sorted = torch.gather(keep, -1, order)
            bot_kept += int(kept_sorted[:, :half].sum())
            bot_n += kept_sorted[:, :half].numel()
            top_kept += int(kept_sorted[:, -half:].sum())
            top_n += kept_sorted[:, -half:].numel()
    return {
        "kept": kept / max(total, 1),
        "kept_top_half": top_kept / max(top_n, 1),
        "kept_bottom_half": bot_kept / max(bot_n, 1),
        "mean_factor": fac_sum / max(kept, 1),
        "l1_ratio": l1_out / max(l1_tau, 1e-30),
        "l1_ratio_max_dev": dev,
    }


STAT_TOL = {"kept": 0.02, "kept_top_half": 0.03, "kept_bottom_half": 0.03, "mean_factor": 0.05, "l1_ratio": 0.05,
            "l1_ratio_max_dev": 0.01}


def run_mergekit(binary: str, cfg: Path, out: Path, seed: int) -> tuple[bool, str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [binary, str(cfg), str(out), "--random-seed", str(seed), "--no-write-model-card", "--no-copy-tokenizer"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    tail = (p.stdout + p.stderr).strip().splitlines()
    msg = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
    return p.returncode == 0, msg, time.time() - t0


def mergekit_version(binary: str) -> str:
    py = Path(binary).parent / "python"
    try:
        out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True, timeout=120).stdout.split()
        return f"mergekit {out[0]} (torch {out[1]})"
    except Exception:  # noqa: BLE001 - informative only
        return "mergekit (version unknown)"


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-bin", default=DEFAULT_BIN, help="path of mergekit-yaml (separate virtualenv)")
    ap.add_argument("--workdir", default=None, help="keep zoo, recipes and outputs here (default: a temp folder)")
    ap.add_argument("--only", default=None, help="comma-separated case names (or method names)")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs difference for PASS (float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="mergekit runs in parallel")
    ap.add_argument("--markdown", default=None, help="also write the result table to this markdown file")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    ap.add_argument("--large", action="store_true",
                    help="wider zoo (hidden 512, MLP 2304: MLP matrices have 1.18M elements, above mergekit's 1M "
                         "slerp chunk and arcee_fusion sample size)")
    ap.add_argument("--reuse", action="store_true", help="reuse mergekit outputs in --workdir whose recipe is unchanged")
    ap.add_argument("--paper-defaults", action="store_true",
                    help="negative control: run mergesmith WITHOUT the mergekit-mode parameters (expect FAILs where "
                         "the paper default differs from mergekit)")
    args = ap.parse_args(argv)

    if not Path(args.mergekit_bin).exists():
        print(f"error: mergekit-yaml not found at {args.mergekit_bin}; create the venv (see docs/mergekit_parity.md)")
        return 2

    import torch

    from mergesmith.methods.base import MergeError, get_method
    from mergesmith.run import run_recipe

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_zoo  # noqa: E402  (tests/ helper, builds tiny HF models locally)

    cases = CASES
    if args.only:
        sel = {s.strip() for s in args.only.split(",")}
        cases = [c for c in CASES if c["name"] in sel or c["mk"]["merge_method"] in sel]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mk-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    zoo_dir = work / "zoo"
    if (zoo_dir / "ft2" / "config.json").exists():
        paths = {k: zoo_dir / k for k in ("base", "ft0", "ft1", "ft2")}
    else:
        kw = dict(hidden_size=512, intermediate_size=2304, num_attention_heads=8, num_key_value_heads=4) if args.large else {}
        paths = write_zoo(zoo_dir, "llama", n=3, seed=args.seed, dtype=torch.float32, **kw)
    import yaml

    version = mergekit_version(args.mergekit_bin)
    print(f"{version}; mergesmith in {sys.executable} (torch {torch.__version__}); work dir {work}")

    # mergekit runs go to a small thread pool (subprocesses) while mergesmith runs here
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    futures = {}
    import shutil

    for c in cases:
        d = work / c["name"]
        d.mkdir(parents=True, exist_ok=True)
        if (d / "ms_out").exists():
            shutil.rmtree(d / "ms_out")
        text = yaml.safe_dump(_subst(c["mk"], paths), sort_keys=False)
        cfg = d / "mergekit.yml"
        if args.reuse and cfg.exists() and cfg.read_text() == text and (d / "mk_out" / "config.json").exists():
            futures[c["name"]] = pool.submit(lambda: (True, "reused", 0.0))
            continue
        if (d / "mk_out").exists():
            shutil.rmtree(d / "mk_out")
        cfg.write_text(text)
        futures[c["name"]] = pool.submit(run_mergekit, args.mergekit_bin, cfg, d / "mk_out", args.seed)

    rows = []
    for c in cases:
        d = work / c["name"]
        method = c["mk"]["merge_method"]
        row = {"case": c["name"], "method": method, "stochastic": bool(c.get("stochastic"))}
        try:
            get_method(method)
            ms = _subst(mergesmith_recipe(c, not args.paper_defaults), paths)
            ms_name = "mergesmith_paper_defaults.yml" if args.paper_defaults else "mergesmith.yml"
            (d / ms_name).write_text(yaml.safe_dump(ms, sort_keys=False))
            row["ms_params"] = {**get_method(method).mergekit_params, **ms.get("parameters", {})} \
                if not args.paper_defaults else ms.get("parameters", {})
            t0 = time.time()
            run_recipe(ms, d / "ms_out", seed=args.seed)
            row["ms_s"] = time.time() - t0
            row["ms_ok"] = True
        except MergeError as e:
            row["ms_ok"], row["ms_err"] = False, f"MergeError: {e}"
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["ms_ok"], row["ms_err"] = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        ok, msg, secs = futures[c["name"]].result()
        row["mk_ok"], row["mk_s"] = ok, secs
        if not ok:
            row["mk_err"] = msg
        if row["ms_ok"] and ok:
            a, b = load_state(d / "ms_out"), load_state(d / "mk_out")
            if row["stochastic"]:
                base, ft = load_state(paths["base"]), load_state(paths["ft0"])
                sa, sb = dropout_stats(a, base, ft), dropout_stats(b, base, ft)
                row["stats_ms"], row["stats_mk"] = sa, sb
                bad = [k for k, tol in STAT_TOL.items()
                       if abs(sa[k] - sb[k]) > (tol * abs(sb[k]) if k == "mean_factor" else tol)]
                row["result"] = "STATS-OK" if not bad else "STATS-DIFF(" + ",".join(bad) + ")"
                row["cmp"] = compare(a, b)
            else:
                r = compare(a, b)
                row["cmp"] = r
                fine = not r["only_ms"] and not r["only_mk"] and not r["shape_mismatch"] and r["max_abs"] <= args.tol
                row["result"] = "PASS" if fine else "FAIL"
        else:
            row["result"] = "MS-ERROR" if not row["ms_ok"] else "MK-ERROR"
        rows.append(row)
        _print_row(row)
    pool.shutdown()

    table = render_table(rows, args.tol)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(f"{version}; tolerance {args.tol:g} abs\n\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0 if all(r["result"] in ("PASS", "STATS-OK") for r in rows) else 1


def _print_row(row: dict) -> None:
    extra = ""
    if "cmp" in row and not row["stochastic"]:
        c = row["cmp"]
        extra = f"max_abs={c['max_abs']:.3g} worst={c['worst']}"
        if c["only_ms"] or c["only_mk"]:
            extra += f" only_ms={c['only_ms'][:3]} only_mk={c['only_mk'][:3]}"
        if c["shape_mismatch"]:
            extra += f" shape_mismatch={c['shape_mismatch'][:3]}"
    elif "stats_ms" in row:
        extra = "ms=" + json.dumps({k: round(v, 4) for k, v in row["stats_ms"].items()}) + \
                " mk=" + json.dumps({k: round(v, 4) for k, v in row["stats_mk"].items()})
    else:
        extra = row.get("ms_err") or row.get("mk_err") or ""
    print(f"[{row['result']}] {row['case']}: {extra}", flush=True)


def render_table(rows: list[dict], tol: float) -> str:
    out = ["| case | method | #tensors | max abs diff | max rel diff | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("cmp")
        if c is None:
            err = (r.get("ms_err") or r.get("mk_err") or "").replace("|", "/")[:90]
            out.append(f"| {r['case']} | {r['method']} | - | - | - | {r['result']}: {err} |")
            continue
        if r["stochastic"]:
            sa, sb = r["stats_ms"], r["stats_mk"]
            s = "; ".join(f"{k} {sa[k]:.3f}/{sb[k]:.3f}" for k in sa)
            out.append(f"| {r['case']} | {r['method']} | {c['n']} | (random masks) | - | {r['result']} (ms/mk: {s}) |")
            continue
        res = r["result"]
        if c["only_ms"] or c["only_mk"]:
            res += f" (tensor sets differ: +{len(c['only_ms'])}/-{len(c['only_mk'])})"
        elif r["result"] == "FAIL":
            res += f" (worst: {c['worst']})"
        out.append(f"| {r['case']} | {r['method']} | {c['n']} | {c['max_abs']:.2e} | {c['max_rel']:.2e} | {res} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
