"""OPCM cost: one projection step per matrix, per model, and end to end (a script that prints figures).

    python benchmarks/continual_opcm.py matrices [--threads 2]          # 4096x4096, 2048x5632, ...
    python benchmarks/continual_opcm.py model --preset speedbench       # compute-only time of one OPCM step
    python benchmarks/continual_opcm.py e2e [--threads 2]                # `continual add` x3 + export, and
                                                                         # the one-shot `opcm` recipe, on the
                                                                         # 0.5B benchmark of benchmarks/speed.py

One OPCM step per matrix = a thin SVD of the merged update (float32, LAPACK gesdd) + two basis changes.
``continual add`` does one step per matrix per model (the first model needs none); the one-shot ``opcm``
method with N models does N-1 steps per matrix, twice (statistics pass + apply pass).
Figures: wall seconds and process CPU seconds (CPU/threads ~ uncontended wall when the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

PRESETS = {
    # the 0.5B benchmark of benchmarks/speed.py (Llama-shaped, untied lm_head)
    "speedbench": dict(hidden=2048, layers=8, inter=5632, vocab=32000, kv=2048, tied=False),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, inter=4864, vocab=151936, kv=128, tied=True),
    "llama-7b": dict(hidden=4096, layers=32, inter=11008, vocab=32000, kv=4096, tied=False),
}


def matrix_shapes(hidden, layers, inter, vocab, kv, tied) -> Counter:
    """Shapes of the projected (2-D, non-embedding) weights and how often each occurs."""
    c: Counter = Counter()
    c[(hidden, hidden)] += 2 * layers  # q, o
    c[(kv, hidden)] += 2 * layers  # k, v
    c[(inter, hidden)] += 2 * layers  # gate, up
    c[(hidden, inter)] += layers  # down
    if not tied:
        c[(vocab, hidden)] += 1  # lm_head (nn.Linear)
    return c


def time_step(shape, reps: int = 1) -> tuple[float, float]:
    import torch

    from mergesmith.continual import opcm as O

    g = torch.Generator().manual_seed(0)
    d = torch.randn(shape, generator=g) * 0.002
    tau = torch.randn(shape, generator=g) * 0.002
    O.step("w", d, tau, 0.5)  # warm-up (small shapes) / allocator
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        O.step("w", d, tau, 0.5)
    return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps


def cmd_matrices(a) -> None:
    for shape in [(4096, 4096), (2048, 5632), (5632, 2048), (4096, 11008), (896, 4864), (4864, 896), (896, 896)]:
        wall, cpu = time_step(shape)
        print(f"{shape[0]:>6} x {shape[1]:<6} OPCM step: wall {wall:7.2f} s   cpu {cpu:7.2f} s", flush=True)


def cmd_model(a) -> None:
    cfg = PRESETS[a.preset]
    shapes = matrix_shapes(**cfg)
    total_w = total_c = 0.0
    for shape, n in sorted(shapes.items()):
        wall, cpu = time_step(shape)
        total_w += n * wall
        total_c += n * cpu
        print(f"{str(shape):>16} x{n:<4} wall {wall:6.2f} s  cpu {cpu:6.2f} s  -> {n * cpu:7.1f} cpu s", flush=True)
    print(f"{a.preset}: one OPCM step over every matrix (compute only): wall {total_w:.0f} s, cpu {total_c:.0f} s "
          f"(threads {a.threads})")


CHILD = r"""
import json, resource, sys, threading, time
args = json.loads(sys.argv[1])
peak = {"RssAnon": 0, "RssFile": 0}
def sample():  # anonymous (heap) vs file-backed (mmapped safetensors pages, reclaimable) resident memory
    while True:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in peak:
                peak[k] = max(peak[k], int(line.split()[1]) // 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
import torch
if args.get("threads"):
    torch.set_num_threads(args["threads"])
out = {}
if args["mode"] == "continual":
    from mergesmith.continual import ContinualMerger
    cm = ContinualMerger(args["state"])
    cm.init(args["base"], method="opcm")
    for i, m in enumerate(args["models"]):
        w, c = time.time(), time.process_time()
        cm.add(m)
        out[f"add{i + 1}"] = [time.time() - w, time.process_time() - c]
    w, c = time.time(), time.process_time()
    cm.export(args["out"])
    out["export"] = [time.time() - w, time.process_time() - c]
    out["state_bytes"] = cm.status()["state_bytes"]
else:
    from mergesmith.run import run_recipe
    w, c = time.time(), time.process_time()
    run_recipe({"merge_method": "opcm", "base_model": args["base"], "models": [{"model": m} for m in args["models"]]},
               args["out"], threads=args.get("threads"))
    out["one_shot"] = [time.time() - w, time.process_time() - c]
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["peak_anon_mb"], out["peak_file_mb"] = peak["RssAnon"], peak["RssFile"]
print(json.dumps(out))
"""


def cmd_e2e(a) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import build  # the 0.5B benchmark's checkpoints (cached)

    cfg = dict(PRESETS["speedbench"])
    if a.layers:
        cfg["layers"] = a.layers
    cache = Path(a.cache) / f"llama-h{cfg['hidden']}-l{cfg['layers']}-i{cfg['inter']}-v{cfg['vocab']}"
    paths = build(cache, cfg["hidden"], cfg["layers"], cfg["inter"], cfg["vocab"])
    models = [str(paths[f"ft{i}"]) for i in range(3)]
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            args = {"mode": mode, "base": str(paths["base"]), "models": models, "threads": a.threads,
                    "state": str(Path(tmp) / "state"), "out": str(Path(tmp) / "out")}
            w0 = time.time()
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{mode}: failed: {res.stderr.strip().splitlines()[-1:]}")
                continue
            data = json.loads(res.stdout.strip().splitlines()[-1])
            data["total_wall"] = time.time() - w0
            print(f"{mode}: " + json.dumps(data), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=("matrices", "model", "e2e"))
    ap.add_argument("--preset", default="speedbench", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="continual,one_shot")
    ap.add_argument("--layers", type=int, default=None, help="e2e: fewer layers than the 0.5B benchmark's 8")
    ap.add_argument("--cache", default=os.environ.get("MERGESMITH_BENCH_CACHE", str(Path.home() / ".cache" / "mergesmith" / "speedbench")))
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    {"matrices": cmd_matrices, "model": cmd_model, "e2e": cmd_e2e}[a.cmd](a)


if __name__ == "__main__":
    main()
