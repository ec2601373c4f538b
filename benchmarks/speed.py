"""Speed and memory benchmark of the streaming engine (a script that prints figures, not a test).

Builds once (cached) 4 Llama-shaped checkpoints of ~0.54B parameters in bf16 — a base and 3
fine-tune-like variants (base + small noise), sharded ~400 MB — then, for each method, runs an end-to-end
merge in a fresh subprocess and prints wall seconds, peak RSS and input GB/s next to the *floor*: the time
to merely read every input tensor once and write an output of the same size, in two forms measured
alternately: the *floor* (each whole tensor of the 4 inputs read into new memory, then the output written:
the issue's definition, used for the targets since the first session) and the *I/O floor* (the same bytes
in the engine's 4M-element row chunks, read into reused buffers: no page faults on fresh memory, which cost
the whole-tensor floor 1-3 s here; the least these bytes take). `x io` is a method's wall over the I/O floor.
Each floor times its reads and its write apart; for a method with k inputs it counts k/4 of the reads and
the whole write (writing a byte costs several times more than reading one here: new page-cache pages).

    python benchmarks/speed.py [--methods linear,ties,...] [--repeat N] [--cache DIR] [--hidden 2048 --layers 8] [--device cuda]

Targets (2 cores): element-wise methods within 2x of the floor; ties/dare/della within 4x; peak RSS
under 1.5 GB.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (here and in the children)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = [
    "linear", "task_arithmetic", "slerp", "nuslerp", "multislerp", "karcher", "ties", "dare_linear", "dare_ties",
    "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "sce", "nearswap", "arcee_fusion",
    "magmax", "emr", "consensus_ta", "consensus_ties", "pcb", "lines", "twin_merging", "passthrough", "tsv_m",
    "iso_c", "iso_cts", "resm", "opcm", "ram", "ramplus_tl", "ramplus",
]

PARAMS = {  # sensible settings per method (others use the method's `example`)
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
}


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build(cache: Path, hidden: int, layers: int, inter: int, vocab: int) -> dict[str, Path]:
    import torch

    from mergesmith.io.writer import ShardedWriter

    shapes = llama_shapes(hidden, layers, inter, vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    paths = {}
    for k, name in enumerate(["base", "ft0", "ft1", "ft2"]):
        folder = cache / name
        paths[name] = folder
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        entries = {n: (s, torch.bfloat16) for n, s in shapes.items()}
        w = ShardedWriter(folder, entries, 400 * 10**6)
        for j, (n, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(j)
            t = torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)
            if k > 0:  # fine-tune-like: small structured delta
                g2 = torch.Generator().manual_seed(1000 * k + j)
                t = t + torch.randn(s, generator=g2) * 0.002
            w.write(n, t.to(torch.bfloat16))
        w.close()
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        print(f"built {folder}", file=sys.stderr)
    return paths


CHILD = r"""
import json, math, resource, sys, time
args = json.loads(sys.argv[1])
from pathlib import Path
import torch
from mergesmith.io.checkpoint import open_checkpoint
from mergesmith.io.writer import ShardedWriter
from mergesmith.run import run_recipe
t0, c0 = time.time(), time.process_time()  # imports excluded: the figure is the merge itself
extra = {}
if args["method"] in ("__floor__", "__io_floor__"):
    # __floor__: whole tensors, each read into new memory; __io_floor__: the engine's row chunks, read into
    # reused buffers (the bytes' own cost). Reading and writing are timed apart: a write costs more per byte
    # than a read (new page-cache pages), so a method with fewer inputs gets floor = reads * inputs / 4 + write.
    from mergesmith.engine import CHUNK_ELEMENTS
    cks = [open_checkpoint(p) for p in args["inputs"]]
    names = cks[0].keys()
    w = ShardedWriter(Path(args["out"]), {n: (cks[0].meta(n).shape, cks[0].meta(n).dtype) for n in names}, 2 * 10**9)
    t_read = t_write = 0.0
    for n in names:
        shape = cks[0].meta(n).shape
        row = math.prod(shape[1:]) if len(shape) >= 2 else 0
        step = max(1, CHUNK_ELEMENTS // row) if row and args["method"] == "__io_floor__" else None
        for a in range(0, shape[0], step) if step else [None]:
            t = time.time()
            ts = [c.get(n) if a is None else c.get(n, (a, a + step)) for c in cks]
            t_read += time.time() - t
            t = time.time()
            w.write(n, ts[0], 0 if a is None else a * row * ts[0].element_size())
            t_write += time.time() - t
            del ts
    t = time.time()
    w.close()
    extra = {"read": t_read, "write": t_write + time.time() - t}
else:
    run_recipe(args["recipe"], args["out"], threads=args.get("threads"), device=args.get("device", "cpu"))
wall = time.time() - t0
gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
# VmHWM: this process's own peak; ru_maxrss also counts the pages of the parent it was forked from (a
# parent that built the checkpoints first made every child report ~1 GB)
peak = next((int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"wall": wall, "cpu": time.process_time() - c0, "gpu_mb": gpu_mb,
                  "rss_mb": peak, **extra}))
"""


def model_count(spec) -> int:
    """Models (besides the base) a method is given here: 3, or fewer / more where it takes so."""
    n = spec.max_models if spec.max_models is not None else 3
    return max(spec.min_models, min(n, 3))


def bench_recipe(method: str, paths: dict, params: dict | None = None) -> dict:
    """The benchmark's recipe for ``method`` over the checkpoints ``paths`` (base, ft0..ft2): its example
    parameters, updated by PARAMS and ``params``."""
    from mergesmith.methods.base import get_method

    spec = get_method(method)
    recipe = {"merge_method": method, "models": [{"model": str(paths[f"ft{i}"])} for i in range(model_count(spec))],
              "parameters": {**spec.example, **PARAMS.get(method, {}), **(params or {})}}
    if spec.base != "none":
        recipe["base_model"] = str(paths["base"])
    return recipe


def run_one(method: str, paths: dict, threads: int | None, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory(dir=paths["base"].parent) as tmp:
        out = Path(tmp) / "out"
        args: dict = {"out": str(out), "threads": threads, "method": method, "device": device}
        if method in ("__floor__", "__io_floor__"):
            out.mkdir()
            args["inputs"] = [str(paths[k]) for k in ("base", "ft0", "ft1", "ft2")]
            n_in = 4
        else:
            args["recipe"] = recipe = bench_recipe(method, paths)
            n_in = len(recipe["models"]) + ("base_model" in recipe)
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
        if res.returncode != 0:
            return {"method": method, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
        data = json.loads(res.stdout.strip().splitlines()[-1])
        data["method"] = method
        data["inputs"] = n_in
        return data


WARM = """
import json, sys, torch
from mergesmith import merge_state_dicts
from mergesmith.methods.base import get_method
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(600, 512, generator=g).to(torch.bfloat16)}  # > 2 blocks: the fused block path
models = [{"w": (base["w"].float() + 0.01 * torch.randn(600, 512, generator=g)).to(torch.bfloat16)} for _ in range(3)]
for m, params, n in json.loads(sys.argv[1]):  # n: the models the timed run gives it
    spec = get_method(m)
    if spec.raw_inputs is None:
        continue
    try:
        merge_state_dicts(m, models[:n], base=None if spec.base == "none" else base, **params)
    except Exception as e:  # one method failing to warm must not leave the others cold
        print(f"warm {m}: {e}", file=sys.stderr)
"""


def warm(methods: list[str]) -> None:
    """Compile the fused kernels once (numba caches them on disk) so no timed run pays for it: a first
    merge after installing or upgrading mergesmith takes a few seconds longer."""
    from mergesmith.methods.base import MergeError, get_method

    todo = []
    for m in methods:
        try:
            spec = get_method(m)
        except MergeError:
            continue
        todo.append((m, {**spec.example, **PARAMS.get(m, {})}, model_count(spec)))
    subprocess.run([sys.executable, "-c", WARM, json.dumps(todo)], check=False, capture_output=True)


def sweep_stale(cache: Path, age_s: float = 3600.0) -> None:
    """Remove the output folders (``tmp*``) that killed runs left in the cache (a 1 GB merge output each),
    once they are an hour old (a run in progress elsewhere keeps its own)."""
    import shutil

    for d in cache.glob("tmp*"):
        if d.is_dir() and time.time() - d.stat().st_mtime > age_s:
            shutil.rmtree(d, ignore_errors=True)


def scaled(floor: dict, inputs: int) -> float:
    """A floor (4 inputs read, 1 output written) for ``inputs`` inputs: its reads scaled, its write and the
    rest (opening files) kept."""
    return floor["wall"] - floor["read"] * (1 - inputs / 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--cache", default=os.environ.get("MERGESMITH_BENCH_CACHE", str(Path.home() / ".cache" / "mergesmith" / "speedbench")))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="compute device of the merges (cpu, cuda); the floor is device-free")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per method, best wall kept (the floor is always the best of max(2, repeat) runs)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args()
    cache = Path(a.cache) / f"llama-h{a.hidden}-l{a.layers}-i{a.intermediate}-v{a.vocab}"
    paths = build(cache, a.hidden, a.layers, a.intermediate, a.vocab)
    sweep_stale(cache)
    model_gb = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e9
    # best of two: the first read after the files were idle can be several times slower (page cache),
    # which would flatter every ratio below
    warm(a.methods.split(","))
    floors, io_floors = [], []
    for _ in range(max(2, a.repeat)):  # alternating, so both see the same moments of a shared machine
        floors.append(run_one("__floor__", paths, a.threads))
        io_floors.append(run_one("__io_floor__", paths, a.threads))
    floor = min(floors, key=lambda r: r["wall"])
    io_floor = min(io_floors, key=lambda r: r["wall"])
    rows = [floor, io_floor]
    for label, best, tries in (("floor: read 4 inputs (whole tensors) + write 1 output", floor, floors),
                               ("I/O floor: the same bytes in the engine's row chunks, reused buffers", io_floor, io_floors)):
        walls = ", ".join(f"{r['wall']:.1f}" for r in tries)
        print(f"{label}: {best['wall']:.1f} s (best of {walls} s; reads {best['read']:.1f} s, write "
              f"{best['write']:.1f} s), peak RSS {best['rss_mb']:.0f} MB")
    print(f"model size {model_gb:.2f} GB (bf16); floors: reads scaled to each method's input count, plus the write; "
          f"x io = wall / I/O floor")
    gpu = a.device != "cpu"
    print(f"{'method':<18}{'inputs':>7}{'wall s':>9}{'floor s':>9}{'x floor':>9}{'x io':>7}{'RSS MB':>9}{'in GB/s':>9}"
          f"{'CPU s':>9}{'load':>11}" + (f"{'GPU MB':>9}" if gpu else ""))
    from mergesmith.methods.base import MergeError, get_method

    for m in [x for x in a.methods.split(",") if x]:
        try:
            get_method(m)
        except MergeError:
            print(f"{m:<18} (not registered)")
            continue
        load0 = os.getloadavg()[0]
        runs = [run_one(m, paths, a.threads, a.device) for _ in range(max(1, a.repeat))]
        ok = [x for x in runs if "error" not in x]
        r = min(ok, key=lambda x: x["wall"]) if ok else runs[0]
        if len(ok) > 1:
            r["walls"] = [x["wall"] for x in ok]
        r["load"] = [load0, os.getloadavg()[0]]  # other jobs on the machine inflate wall (less so CPU) time
        rows.append(r)
        if "error" in r:
            print(f"{m:<18} error: {r['error']}")
            continue
        fl, io = scaled(floor, r["inputs"]), scaled(io_floor, r["inputs"])
        r["floor"], r["io_floor"] = fl, io
        print(f"{m:<18}{r['inputs']:>7}{r['wall']:>9.1f}{fl:>9.1f}{r['wall'] / fl:>9.2f}{r['wall'] / io:>7.2f}{r['rss_mb']:>9.0f}"
              f"{r['inputs'] * model_gb / r['wall']:>9.2f}{r['cpu']:>9.1f}{r['load'][0]:>6.1f}-{r['load'][1]:<4.1f}"
              + (f"{r['gpu_mb']:>9.0f}" if gpu else "")
              + (f"  (walls {', '.join(f'{w:.1f}' for w in r['walls'])})" if "walls" in r else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
