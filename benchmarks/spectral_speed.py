"""Speed of the spectral methods (TSV-M, Iso-C, Iso-CTS, RESM, Twin compression) on a Llama-shaped
0.5B model: hidden 2048, intermediate 5632, 8 layers, vocab 32000, base + 3 fine-tunes.

Per layer the model has 4 attention matrices 2048x2048, gate/up 5632x2048 and down 2048x5632, so the
merge SVDs 32 + 16 + 8 matrices; embeddings, lm_head and norms take the mean fallback (negligible).

    python benchmarks/spectral_speed.py                   # SVD timings + per-matrix method timings + estimate
    python benchmarks/spectral_speed.py --methods tsv_m --options svd=gram,orthogonalize=eigh
    python benchmarks/spectral_speed.py --full tsv_m      # also a real end-to-end merge of a generated model

Timings use ``--threads`` torch threads (default 2). Prints wall and CPU seconds; on a machine shared
with other jobs wall time is inflated, CPU time much less so.
"""
from __future__ import annotations

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


def method_timings(methods, options):
    from mergesmith.api import merge_tensors

    g = torch.Generator().manual_seed(1)
    total = {m: 0.0 for m in methods}
    total_cpu = {m: 0.0 for m in methods}
    for shape, count in SHAPES.items():
        base = torch.randn(shape, generator=g) * 0.02
        models = [base + 1e-3 * torch.randn(shape, generator=g) for _ in range(3)]
        for m in methods:
            if m == "twin_compress":
                from mergesmith.methods.tsv import tsv_c_compress

                svd = options.get("svd", "exact")
                w, c, _ = timed(lambda: [tsv_c_compress(x - base, 0.1, svd=svd) for x in models])
            else:
                w, c, _ = timed(lambda: merge_tensors(m, models, base, name="model.layers.0.mlp.w.weight", **options))
            total[m] += w * count
            total_cpu[m] += c * count
            print(f"  {m:<14} {shape[0]}x{shape[1]:<5} x{count:<3} wall {w:6.2f}s  cpu {c:6.2f}s per matrix", flush=True)
    print("estimated SVD work for the 0.5B model (56 matrices):")
    for m in methods:
        print(f"  {m:<14} wall {total[m]:7.1f}s ({total[m] / 60:.1f} min)  cpu {total_cpu[m]:7.1f}s")


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="tsv_m,iso_c,iso_cts,resm,twin_compress")
    ap.add_argument("--options", default="", help="method parameters, e.g. svd=gram,orthogonalize=eigh")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw SVD timings")
    ap.add_argument("--full", default="", help="comma-separated methods to run end to end on a generated model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    options = dict(kv.split("=", 1) for kv in a.options.split(",") if kv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, options {options or 'defaults'}")
    if not a.no_raw:
        svd_timings()
    methods = [m for m in a.methods.split(",") if m]
    if methods:
        method_timings(methods, options)
    if a.full:
        full_run([m for m in a.full.split(",") if m], options, a.threads)


if __name__ == "__main__":
    main()
