"""Cost of the row-ranking methods' block path on one tensor (a script that prints figures, not a test).

DELLA (MagPrune) and Breadcrumbs rank every row of every task vector exactly (stable order of |tau|). This
times one Llama MLP-shaped tensor (rows of 2048, bf16 base + 3 fine-tune-like variants) merged through the
engine's block path on one thread, best of ``--repeat`` runs:

- ns per task-vector element, with 0, 1 or 2 of the three models left unchanged (all-zero task vectors:
  their rows skip the sort);
- the Python cost per block: the same merge with 4096-element blocks minus the 128K-element blocks of the
  engine, divided by the extra block count.

    python benchmarks/rank_block.py [--rows 2816] [--repeat 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2816)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from mergesmith.methods import _fused
    from mergesmith.methods import _sampling as S
    from mergesmith.methods import breadcrumbs, della
    from mergesmith.methods.base import TensorContext

    torch.set_num_threads(args.threads)
    if not _fused.enabled():
        raise SystemExit("numba is not available: the block kernels do not run")
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(shape, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    common = {"weight": [1.0] * 3, "int8_mask": False}
    cases = {
        "della": (della._DELLA, {**common, "density": [0.7] * 3, "epsilon": [0.07] * 3, "lambda": 1.1,
                                 "rescale": "inverse_keep_prob", "elect": "mass", "agg": "weighted_mean",
                                 "zero_sign": "positive", "weighted_elect": True, "normalize": None}),
        "breadcrumbs": (breadcrumbs._LINEAR, {**common, "density": [0.15] * 3, "gamma": [0.006] * 3,
                                              "lambda": 0.2, "scope": "row", "rescale": "none",
                                              "normalize": False}),
    }

    def best(pipe, p, ms) -> float:
        def once() -> float:
            t0 = time.perf_counter()
            pipe.merge(TensorContext(name="w", seed=1, raw=True, out_dtype=torch.bfloat16), base, ms, p)
            return time.perf_counter() - t0
        once()  # kernels compiled / loaded
        return min(once() for _ in range(args.repeat))

    n = 3 * base.numel()
    print(f"tensor {shape[0]} x {shape[1]} bf16, 3 models, {args.threads} thread(s), best of {args.repeat}")
    for name, (pipe, p) in cases.items():
        full = best(pipe, p, models)
        one = best(pipe, p, [base.clone(), *models[1:]])
        two = best(pipe, p, [base.clone(), base.clone(), models[2]])
        print(f"{name:12s} {full / n * 1e9:6.2f} ns per task-vector element; one model unchanged "
              f"{one / full:.2f}x, two unchanged {two / full:.2f}x of that time")
        block = S.BLOCK
        try:
            S.BLOCK = 4096
            small = best(pipe, p, models)
        finally:
            S.BLOCK = block
        rows = max(1, block // shape[1])
        extra = -(-shape[0] // max(1, 4096 // shape[1])) - -(-shape[0] // rows)
        print(f"{'':12s} Python per block ~{(small - full) / extra * 1e6:.0f} us ({extra} extra blocks of 4096)")


if __name__ == "__main__":
    main()
