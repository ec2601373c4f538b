"""CPU seconds per thread of one merge of the speed benchmark's checkpoints (a script that prints figures).

Runs one recipe in this process (``benchmarks/speed.py``'s recipe for the method, on its cached
checkpoints) while a sampler thread reads every thread's user and system time from ``/proc/self/task``
every 20 ms, then prints them per thread kind (kernel, read, write, numba warm-up, main). Linux only.
Where the CPU of a merge goes, without a profiler's overhead:

    python benchmarks/thread_cpu.py della [--params '{"density": 0.5}'] [--threads 2] [--timeline]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Keeps the latest (user, system) clock ticks of every thread, named by Python's thread names."""

    def __init__(self):
        super().__init__(daemon=True, name="sampler")
        self.ticks: dict[tuple[int, int], tuple[str, int, int]] = {}  # (tid, start time): a tid can be reused
        self.history: list[tuple[float, dict[str, int]]] = []
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            names = {t.native_id: t.name for t in threading.enumerate() if t.native_id}  # live Python threads
            for tid in os.listdir("/proc/self/task"):
                try:
                    stat = open(f"/proc/self/task/{tid}/stat").read()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                key = (int(tid), int(fields[19]))
                name = names.get(key[0]) or self.ticks.get(key, ("native (not a Python thread)",))[0]
                self.ticks[key] = (name, int(fields[11]), int(fields[12]))
            self.history.append((time.time(), {kind(n): u + s for n, u, s in self.ticks.values()}))
            time.sleep(0.02)


def kind(name: str) -> str:
    """A thread's kind: its name without the pool index."""
    return name if name.startswith("native") else name.rstrip("0123456789_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method")
    ap.add_argument("--params", default="{}", help="method parameters (JSON) over speed.py's (its example + PARAMS)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=os.environ.get("MERGESMITH_BENCH_CACHE",
                                                      str(Path.home() / ".cache" / "mergesmith" / "speedbench")))
    ap.add_argument("--shape", default="llama-h2048-l8-i5632-v32000", help="the speed benchmark's cache folder")
    ap.add_argument("--timeline", action="store_true", help="also print cores busy per 0.5 s")
    a = ap.parse_args()

    sampler = Sampler()
    sampler.start()
    from mergesmith.run import run_recipe
    from speed import bench_recipe  # benchmarks/ is on the path: this script's folder

    cache = Path(a.cache) / a.shape
    recipe = bench_recipe(a.method, {k: cache / k for k in ("base", "ft0", "ft1", "ft2")}, json.loads(a.params))
    before = dict(sampler.ticks)
    out = Path(tempfile.mkdtemp(dir=cache)) / "out"
    try:
        t0, c0 = time.time(), time.process_time()
        run_recipe(recipe, out, threads=a.threads)
        wall, cpu = time.time() - t0, time.process_time() - c0
        time.sleep(0.05)
    finally:
        sampler.stop = True
        sampler.join()
        shutil.rmtree(out.parent, ignore_errors=True)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for tid, (name, user, system) in sampler.ticks.items():
        _, u0, s0 = before.get(tid, (name, 0, 0))
        row = per[kind(name)]
        row[0] += (user - u0) / TICK
        row[1] += (system - s0) / TICK
        row[2] += 1
    print(f"{a.method}: wall {wall:.2f} s, CPU {cpu:.2f} s (this sampler included)")
    for name, (user, system, count) in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        if user + system >= 0.005:
            print(f"  {name:<24} threads {count:<3} user {user:6.2f} s  system {system:6.2f} s")
    if a.timeline:
        last = None
        for t, busy in sampler.history:
            if t < t0 or t > t0 + wall or (last is not None and t - last[0] < 0.5):
                continue
            if last is not None:
                rate = Counter({k: (v - last[1].get(k, 0)) / TICK / (t - last[0]) for k, v in busy.items()})
                print(f"  t={last[0] - t0:5.1f}s  cores busy {sum(rate.values()):4.2f}  "
                      + " ".join(f"{k}={v:.2f}" for k, v in rate.most_common(4) if v > 0.05))
            last = (t, busy)


if __name__ == "__main__":
    main()
