#!/usr/bin/env python
"""mergesmith against mergekit 0.1.5 on the speed benchmark's checkpoints: wall time and peak RSS (a script
that prints figures).

The same recipe goes to both command lines, each run in a fresh process as a user runs it (start-up
included): ``mergekit-yaml RECIPE OUT`` from its own virtualenv (``--mergekit-bin``; never a project
dependency) with its default options, and ``mergesmith merge RECIPE OUT`` with ``defaults: mergekit`` added,
so both compute the same math (TIES per tensor, DARE/DELLA's L1 rescale, ...). Inputs: the 4 bf16 Llama
checkpoints of ``benchmarks/speed.py`` (0.54 B parameters, 1.08 GB each; built there on first use). Peak
RSS is the child's own (``os.wait4``).

    python benchmarks/vs_mergekit.py [--mergekit-bin /work/mk-venv/bin/mergekit-yaml] [--methods linear,ties]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the benchmark checkpoints)

ROOT = Path(__file__).resolve().parents[1]


def recipes(paths: dict) -> dict[str, dict]:
    """mergekit recipes over base, ft0..ft2 (every parameter mergekit requires given)."""
    fts = [str(paths[f"ft{i}"]) for i in range(3)]

    def models(**per):
        return [{"model": m, "parameters": dict(per)} if per else {"model": m} for m in fts]

    base = {"base_model": str(paths["base"]), "dtype": "bfloat16"}
    return {
        "linear": {"merge_method": "linear", "models": models(weight=1.0), "dtype": "bfloat16"},
        "slerp": {"merge_method": "slerp", **base, "parameters": {"t": 0.4},
                  "models": [{"model": str(paths["base"])}, {"model": fts[0]}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", **base, "models": models(weight=0.5)},
        "ties": {"merge_method": "ties", **base, "models": models(weight=1.0, density=0.2)},
        "dare_ties": {"merge_method": "dare_ties", **base, "models": models(weight=1.0, density=0.5)},
        "della": {"merge_method": "della", **base, "models": models(weight=1.0, density=0.7, epsilon=0.07)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **base,
                             "models": models(weight=1.0, density=0.9, gamma=0.01)},
        "model_stock": {"merge_method": "model_stock", **base, "models": models()},
        "ram": {"merge_method": "ram", **base, "models": models()},
    }


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB of the child, last error line or '') of one command."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    last = err.strip().splitlines()[-1] if proc.returncode and err.strip() else ""
    return wall, usage.ru_maxrss / 1024, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin/mergekit-yaml")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,della")
    ap.add_argument("--cache", default=os.environ.get("MERGESMITH_BENCH_CACHE",
                                                      str(Path.home() / ".cache" / "mergesmith" / "speedbench")))
    a = ap.parse_args()
    if not Path(a.mergekit_bin).exists():
        print(f"mergekit-yaml not found at {a.mergekit_bin} (python -m venv V && V/bin/pip install torch==2.13.0 "
              "mergekit==0.1.5)")
        return 2
    paths = speed.build(Path(a.cache) / "llama-h2048-l8-i5632-v32000", 2048, 8, 5632, 32000)
    ms_bin = str(Path(sys.executable).with_name("mergesmith"))
    all_recipes = recipes(paths)
    print(f"{'method':<18}{'mergekit s':>11}{'MB':>7}{'mergesmith s':>14}{'MB':>7}{'speed-up':>10}{'RAM ratio':>11}")
    with tempfile.TemporaryDirectory(dir=paths["base"].parent) as tmp:
        for m in a.methods.split(","):
            rec = all_recipes[m]
            mk_cfg, ms_cfg = Path(tmp) / f"{m}.mk.yml", Path(tmp) / f"{m}.ms.yml"
            mk_cfg.write_text(yaml.safe_dump(rec, sort_keys=False))
            ms_cfg.write_text(yaml.safe_dump({**rec, "defaults": "mergekit"}, sort_keys=False))
            out = Path(tmp) / "out"
            ms = run([ms_bin, "merge", str(ms_cfg), str(out), "-q", "--overwrite"])
            shutil.rmtree(out, ignore_errors=True)
            mk = run([a.mergekit_bin, str(mk_cfg), str(out), "--quiet"])
            shutil.rmtree(out, ignore_errors=True)
            if mk[2] or ms[2]:
                print(f"{m:<18} error: mergekit: {mk[2] or 'ok'}; mergesmith: {ms[2] or 'ok'}")
                continue
            print(f"{m:<18}{mk[0]:>11.1f}{mk[1]:>7.0f}{ms[0]:>14.1f}{ms[1]:>7.0f}{mk[0] / ms[0]:>9.1f}x"
                  f"{mk[1] / ms[1]:>10.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
