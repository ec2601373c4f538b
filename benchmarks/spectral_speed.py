"""Speed of the spectral methods (TSV-M, Iso-C, Iso-CTS, RESM, Twin compression) on a Llama-shaped
0.5B model: hidden 2048, intermediate 5632, 8 layers, vocab 32000, base + 3 fine-tunes.

Per layer the model has 4 attention matrices 2048x2048, gate/up 5632x2048 and down 2048x5632, so the
merge SVDs 32 + 16 + 8 matrices; embeddings, lm_head and norms take the mean fallback (negligible).

    python benchmarks/spectral_speed.py                   # SVD timings + per-matrix method timings + estimate
    python benchmarks/spectral_speed.py --methods tsv_m --options "svd=exact,orthogonalize=svd;"
        # ';' separates option sets, timed one after the other in the same run (here: LAPACK, then defaults)
    python benchmarks/spectral_speed.py --full tsv_m      # also a real end-to-end merge of a generated model
    python benchmarks/spectral_speed.py --no-raw --methods "" --e2e iso_c,tsv_m
        # end to end on benchmarks/speed.py's cached 0.5B checkpoints: wall, CPU s and peak RSS
    python benchmarks/spectral_speed.py --no-raw --methods "" --parallel tsv_m,iso_cts,resm
        # one 2048x2048 matrix, 3 models: per-task decompositions one after another with multi-threaded
        # LAPACK (before) vs concurrently, single-threaded each (_spectral.parallel_map), alternating

Timings use ``--threads`` torch threads (default 2). Prints wall and CPU seconds; on a machine shared
with other jobs wall time is inflated, CPU time much less so.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (here and in the children)

import argparse
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {(2048, 2048): 32, (5632, 2048): 16, (2048, 5632): 8}


def timed(fn, reps=1):
    w, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - w) / reps, (time.process_time() - c) / reps, out


def svd_timings():
    print("raw decompositions (float32):")
    g = torch.Generator().manual_seed(0)
    for shape in [(2048, 2048), (5632, 2048), (2048, 5632)]:
        a = torch.randn(shape, generator=g)
        w, c, _ = timed(lambda: torch.linalg.svd(a, full_matrices=False))
        print(f"  torch.linalg.svd {shape[0]}x{shape[1]:<5}  wall {w:6.2f}s  cpu {c:6.2f}s")
    a = torch.randn(2048, 2048, generator=g)
    gram = a.T @ a
    w, c, _ = timed(lambda: torch.linalg.eigh(gram))
    print(f"  torch.linalg.eigh 2048x2048     wall {w:6.2f}s  cpu {c:6.2f}s")


def _known(method: str, options: dict) -> dict:
    """The options that ``method`` takes (e.g. iso_c has no ``orthogonalize``)."""
    if method == "twin_compress":
        return options
    from mergesmith.methods.base import get_method

    names = {p.name for p in get_method(method).params}
    return {k: v for k, v in options.items() if k in names}


def method_timings(methods, option_sets):
    """Per-matrix wall/CPU seconds of each method under each option set (one after the other for every
    matrix, so the sets see the same machine load), and the estimate for the 0.5B model's 56 matrices."""
    import os

    from mergesmith.api import merge_tensors

    g = torch.Generator().manual_seed(1)
    keys = [(m, i) for m in methods for i in range(len(option_sets))]
    total = {k: 0.0 for k in keys}
    total_cpu = {k: 0.0 for k in keys}
    label = {i: (",".join(f"{a}={b}" for a, b in o.items()) or "defaults") for i, o in enumerate(option_sets)}
    for shape, count in SHAPES.items():
        base = torch.randn(shape, generator=g) * 0.02
        models = [base + 1e-3 * torch.randn(shape, generator=g) for _ in range(3)]
        for m, i in keys:
            options = _known(m, option_sets[i])
            if m == "twin_compress":
                from mergesmith.methods.tsv import tsv_c_compress

                svd = options.get("svd", "exact")
                w, c, _ = timed(lambda: [tsv_c_compress(x - base, 0.1, svd=svd) for x in models])
            else:
                w, c, _ = timed(lambda: merge_tensors(m, models, base, name="model.layers.0.mlp.w.weight", **options))
            total[m, i] += w * count
            total_cpu[m, i] += c * count
            print(f"  {m:<14} {label[i]:<32} {shape[0]}x{shape[1]:<5} x{count:<3} wall {w:6.2f}s  cpu {c:6.2f}s per matrix"
                  f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    print("estimated SVD work for the 0.5B model (56 matrices):")
    for m, i in keys:
        print(f"  {m:<14} {label[i]:<32} wall {total[m, i]:7.1f}s ({total[m, i] / 60:.1f} min)  "
              f"cpu {total_cpu[m, i]:7.1f}s")


def parallel_compare(methods, options, reps: int = 2):
    """Wall/CPU seconds of one 2048x2048 merge with 3 models, _spectral.PARALLEL off vs on, same process
    (alternating; medians)."""
    from mergesmith.api import merge_tensors
    from mergesmith.methods import _spectral as sp

    g = torch.Generator().manual_seed(1)
    base = torch.randn(2048, 2048, generator=g) * 0.02
    models = [base + 1e-3 * torch.randn(2048, 2048, generator=g) for _ in range(3)]
    name = "model.layers.0.mlp.w.weight"
    print(f"parallel per-task decompositions, 2048x2048, 3 models, {torch.get_num_threads()} threads, "
          f"{reps} alternating reps each:")
    old = sp.PARALLEL
    for m in methods:
        res = {False: [], True: []}
        outs = {}
        for _ in range(reps):
            for par in (False, True):
                sp.PARALLEL = par
                w, c, outs[par] = timed(lambda: merge_tensors(m, models, base, name=name, **options))
                res[par].append((w, c))
        sp.PARALLEL = old
        best = {k: sorted(v)[len(v) // 2] for k, v in res.items()}  # medians (robust to load bursts)
        diff = float((outs[True] - outs[False]).abs().max())
        print(f"  {m:<10} sequential wall {best[False][0]:6.2f}s cpu {best[False][1]:6.2f}s | parallel wall "
              f"{best[True][0]:6.2f}s cpu {best[True][1]:6.2f}s | speed-up {best[False][0] / best[True][0]:.2f}x "
              f"(max |diff| {diff:.1e}; all walls {[round(w, 2) for w, _ in res[False]]} vs "
              f"{[round(w, 2) for w, _ in res[True]]})", flush=True)


def write_model(root: Path, n_ft: int = 3):
    """A random Llama (hidden 2048, 8 layers, vocab 32000, ~0.54B params) and n_ft perturbed copies, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    print(f"  params: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B")
    model.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_ft):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + (1e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))
        model.save_pretrained(root / f"ft{i}")
    del model, state


def full_run(methods, options, threads):
    from mergesmith.run import run_recipe

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_model(root)
        print(f"  wrote base + 3 fine-tunes in {time.perf_counter() - t:.0f}s")
        for m in methods:
            recipe = {"merge_method": m, "base_model": str(root / "base"),
                      "models": [{"model": str(root / f"ft{i}")} for i in range(3)], "parameters": dict(options),
                      "dtype": "bfloat16"}
            w, c, _ = timed(lambda: run_recipe(recipe, root / f"out_{m}", threads=threads, progress=False))
            print(f"  end-to-end {m:<10} wall {w:7.1f}s ({w / 60:.1f} min)  cpu {c:7.1f}s", flush=True)


_E2E_CHILD = r"""
import json, resource, sys, time
a = json.loads(sys.argv[1])
from mergesmith.run import run_recipe
w, c = time.perf_counter(), time.process_time()
run_recipe(a["recipe"], a["out"], threads=a["threads"], progress=False)
# VmHWM: this process's own peak; ru_maxrss also counts the pages of the parent it was forked from (a
# parent that built the checkpoints first made every child report ~1 GB)
peak = next((int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
                  "rss_mb": peak}))
"""


def cached_e2e(methods, options, threads, cache):
    """End-to-end merges of benchmarks/speed.py's cached checkpoints (base + 3 fine-tunes), each in a fresh
    process, with the method's ``example`` parameters updated by ``options``: wall, CPU seconds (all threads;
    less sensitive to other jobs on the machine than wall) and peak RSS."""
    import json
    import os
    import subprocess
    import sys

    from mergesmith.methods.base import get_method

    root = Path(cache).expanduser()
    if not (root / "base").exists():
        raise SystemExit(f"{root}: run benchmarks/speed.py once to build the cached checkpoints")
    print(f"end to end on {root} ({threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}):")
    for m in methods:
        params = {**get_method(m).example, **options}
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            recipe = {"merge_method": m, "base_model": str(root / "base"), "parameters": params,
                      "models": [{"model": str(root / f"ft{i}")} for i in range(3)]}
            args = {"recipe": recipe, "out": str(Path(tmp) / "out"), "threads": threads}
            load0 = os.getloadavg()[0]
            res = subprocess.run([sys.executable, "-c", _E2E_CHILD, json.dumps(args)], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"  {m:<10} error: {res.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  {m:<10} {params}  wall {r['wall']:6.1f}s ({r['wall'] / 60:.1f} min)  cpu {r['cpu']:6.1f}s  "
                  f"peak RSS {r['rss_mb']:.0f} MB  (load {load0:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tsv_m,iso_c,iso_cts,resm,twin_compress")
    ap.add_argument("--options", default="", help="method parameters, e.g. svd=exact,orthogonalize=svd; several "
                                                   "sets separated by ';' are timed side by side (per-matrix timings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw SVD timings")
    ap.add_argument("--parallel", default="", help="comma-separated methods: sequential vs parallel per-task "
                                                   "decompositions on one 2048x2048 matrix")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of --parallel")
    ap.add_argument("--e2e", default="", help="comma-separated methods to merge end to end on speed.py's cached "
                                              "checkpoints (wall, CPU s, peak RSS)")
    ap.add_argument("--cache", default="~/.cache/mergesmith/speedbench/llama-h2048-l8-i5632-v32000")
    ap.add_argument("--full", default="", help="comma-separated methods to run end to end on a generated model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    option_sets = [dict(kv.split("=", 1) for kv in part.split(",") if kv) for part in a.options.split(";")]
    options = option_sets[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, options {option_sets}")
    if not a.no_raw:
        svd_timings()
    methods = [m for m in a.methods.split(",") if m]
    if methods:
        method_timings(methods, option_sets)
    if a.parallel:
        parallel_compare([m for m in a.parallel.split(",") if m], options, a.reps)
    if a.e2e:
        cached_e2e([m for m in a.e2e.split(",") if m], options, a.threads, a.cache)
    if a.full:
        full_run([m for m in a.full.split(",") if m], options, a.threads)


if __name__ == "__main__":
    main()
