"""Time PCB (scope=global, exact streamed order statistics) on a ~8M-parameter 3-model state dict.

    python benchmarks/pcb_global_speed.py [--save out.pt] [--compare out.pt]

--save writes the merged state dict; --compare checks a later run is bit-identical to a saved one.
"""
from __future__ import annotations

import argparse
import time

import torch

from mergesmith import merge_state_dicts


def zoo(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (4000, 256)}
    for i in range(8):
        shapes |= {f"layers.{i}.attn.weight": (256, 1024), f"layers.{i}.mlp.weight": (1024, 512),
                   f"layers.{i}.norm.weight": (256,)}
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    models = [{k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save")
    ap.add_argument("--compare")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    base, models = zoo()
    print(f"params per model: {sum(v.numel() for v in base.values()) / 1e6:.2f}M, threads {torch.get_num_threads()}")
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        out = merge_state_dicts("pcb", models, base=base, ratio=0.1, clip=1e-4)
        times.append(time.perf_counter() - t)
    print(f"pcb global: best {min(times):.2f}s, all {[round(x, 2) for x in times]}")
    if a.save:
        torch.save(out, a.save)
    if a.compare:
        ref = torch.load(a.compare, weights_only=True)
        same = all(torch.equal(out[k], ref[k]) for k in ref)
        print("bit-identical to saved:", same)


if __name__ == "__main__":
    main()
