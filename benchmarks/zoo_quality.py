"""Quality of the benchmark zoo: the numbers in src/mergesmith/bench/README.md.

For each family and zoo seed (default size): build time, experts vs base, every listed method with
its no-validation defaults, the spread over merge seeds of a random method (DARE), and a lambda sweep
of task arithmetic. Prints markdown; writes the raw records to --json.

    python benchmarks/zoo_quality.py --zoo-seeds 0 1 --json zoo_quality.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

METHODS = ("linear,task_arithmetic,ties,dare_linear,dare_ties,breadcrumbs,della,consensus_ta,pcb,tsv_m,iso_c,"
           "iso_cts,lines,emr,model_stock")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["classify", "bytegpt"])
    ap.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--dare-seeds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from mergesmith.bench import evaluate, runner
    from mergesmith.bench.report import fmt_value
    from mergesmith.bench.zoo import get_zoo

    torch.set_num_threads(1)
    records = []
    for fam in args.families:
        for zs in args.zoo_seeds:
            t0, c0 = time.time(), time.process_time()
            z = get_zoo(fam, seed=zs)
            build = {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1),
                     "manifest_seconds": z.manifest.get("build_seconds")}
            t0 = time.time()
            refs = evaluate.reference_scores(z)
            entries = runner.parse_entries([args.methods])
            entries += runner.expand_sweep(runner.parse_entries(["task_arithmetic"]),
                                           runner.parse_sweep("lambda=0.1:1.0:0.1"))
            res = runner.run_bench(z, entries, refs=refs)
            dare = [runner.run_bench(z, runner.parse_entries(["dare_linear"]), seed=s, refs=refs)["runs"][0]
                    for s in range(args.dare_seeds)]
            checks = evaluate.quality_checks(z, refs, res["runs"])
            records.append({"family": fam, "zoo_seed": zs, "build": build, "bench_wall": round(time.time() - t0, 1),
                            "results": res, "dare_seeds": [d["normalized_average"] for d in dare], "checks": checks})
            print(f"\n## {fam} (zoo seed {zs}): built/loaded in {build['wall']}s wall, {build['cpu']}s CPU "
                  f"(build record {build['manifest_seconds']}s); eval {refs['eval_seconds_per_model']:.2f}s/model")
            m = res["metric"]
            print("| task | base | expert | multi-task |\n|---|---|---|---|")
            for t in z.tasks:
                print(f"| {t} | {fmt_value(refs['base'][t], m)} | {fmt_value(refs['experts'][t], m)} | "
                      f"{fmt_value(refs['multitask'][t], m)} |")
            print("\n| method | avg | normalized | merge s | eval s |\n|---|---|---|---|---|")
            rr = res["reference_rows"]
            print(f"| base | {fmt_value(rr['base']['average'], m)} | {rr['base']['normalized_average']:.3f} | | |")
            for r in res["runs"]:
                if r["status"] == "ok":
                    print(f"| {r['label']} | {fmt_value(r['average'], m)} | {r['normalized_average']:.3f} | "
                          f"{r['merge_seconds']:.2f} | {r['eval_seconds']:.2f} |")
                else:
                    print(f"| {r['label']} | {r['status']}: {r['note']} | | | |")
            ds = records[-1]["dare_seeds"]
            print(f"\ndare_linear over {len(ds)} merge seeds: normalized mean {statistics.mean(ds):.4f}, "
                  f"sd {statistics.pstdev(ds):.4f}, range {min(ds):.4f}..{max(ds):.4f}")
            print(f"experts beat base: {checks['expert_beats_base']}")
            bad = [k for k, v in checks["merge_between_base_and_experts"].items() if not v]
            print(f"merges outside (base, experts): {bad or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
