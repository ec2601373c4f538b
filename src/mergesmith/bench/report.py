"""Report folders: results.json, a markdown table, matplotlib plots and a self-contained HTML page.

matplotlib is imported inside the plotting functions only (Agg backend). Report folders are written
into a temporary folder beside the target and renamed at the end; an existing folder is replaced only
when it is a mergesmith report (it holds ``MARKER``).
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from ..methods.base import MergeError

MARKER = ".mergesmith-report"


# ----------------------------------------------------------------------------------------- tables
def fmt_value(v: float | None, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if metric == "accuracy" else f"{v:.3f}"


def fmt_params(params: dict | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the main comparison: references first, then every run."""
    metric, tasks = results["metric"], results["tasks"]
    unit = " (%)" if metric == "accuracy" else " (loss)"
    header = ["model", "parameters", *tasks, "avg" + unit, "normalized"]
    refs = results["references"]
    rows = []

    def row(label, params, scores, avg, norm):
        rows.append([label, params, *(fmt_value(scores.get(t), metric) for t in tasks),
                     fmt_value(avg, metric), "-" if norm is None else f"{norm:.3f}"])

    rr = results["reference_rows"]
    row("base (pretrained)", "", refs["base"], rr["base"]["average"], rr["base"]["normalized_average"])
    experts = refs["experts"]
    row("experts (each on its own task)", "", experts, sum(experts.values()) / len(experts), 1.0)
    row("multi-task (upper bound)", "", refs["multitask"], rr["multitask"]["average"],
        rr["multitask"]["normalized_average"])
    for r in results["runs"]:
        if r.get("status") == "ok":
            row(r["label"], fmt_params(r.get("params")), r["scores"], r["average"], r["normalized_average"])
        else:
            rows.append([r["label"], f"{r.get('status')}: {r.get('note', '')}", *(["-"] * len(tasks)), "-", "-"])
    return header, rows


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def expert_matrix_table(results: dict) -> tuple[list[str], list[list[str]]]:
    tasks, metric = results["tasks"], results["metric"]
    m = results["references"]["expert_matrix"]
    return ["expert \\ task", *tasks], [[f"expert {e}", *(fmt_value(m[e][t], metric) for t in tasks)] for e in tasks]


def sweep_groups(results: dict) -> dict[str, list[dict]]:
    """Successful sweep runs by the entry they were expanded from, ordered by the swept value."""
    groups: dict[str, list[dict]] = {}
    for r in results["runs"]:
        if r.get("status") == "ok" and r.get("sweep_value") is not None:
            groups.setdefault(r["group"], []).append(r)
    return {g: sorted(rs, key=lambda r: r["sweep_value"]) for g, rs in groups.items()}


def sweep_best(results: dict) -> list[dict]:
    """Per swept method: the best value of the sweep ("oracle-tuned", spec section 18.3)."""
    return [{"method": g, "best_value": best["sweep_value"], "normalized_average": best["normalized_average"],
             "average": best["average"]}
            for g, rs in sweep_groups(results).items() for best in [max(rs, key=lambda r: r["normalized_average"])]]


def markdown(results: dict) -> str:
    z = results["zoo"]
    header, rows = table(results)
    direction = "higher is better" if results["higher_is_better"] else "lower is better"
    norm = ("accuracy / the expert's accuracy" if results["higher_is_better"]
            else "(L_base - L) / (L_base - L_expert): share of the expert's gain kept")
    parts = [
        f"# mergesmith bench: zoo `{z['name']}-{z['version']}`" + (f" ({z['size']})" if z.get("size") != "default" else ""),
        "", f"{z['description']}. {z['merge_note'].capitalize()}.", "",
        f"Metric: {results['metric']} per task ({direction}); normalized = {norm}, averaged over tasks. "
        f"Merge seed {results['seed']}.", "", markdown_table(header, rows), "",
        "## Experts on every task", "", markdown_table(*expert_matrix_table(results)), "",
    ]
    best = sweep_best(results)
    if best:
        parts += ["## Sweep: best value per method (oracle-tuned on these validation sets)", "",
                  markdown_table(["method", "best value", "normalized", "avg"],
                                 [[b["method"], f"{b['best_value']:g}", f"{b['normalized_average']:.3f}",
                                   fmt_value(b["average"], results["metric"])] for b in best]), ""]
    notes = [r for r in results["runs"] if r.get("note")]
    if notes:
        parts += ["## Notes", ""] + [f"- {r['label']}: {r['note']}" for r in notes] + [""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, title: str, legend: int = 0) -> Path:
    """Title, legend outside the axes on the right (font size ``legend``; 0 = none), save, close."""
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _final_runs(results: dict) -> list[dict]:
    """Runs shown in bar plots: everything that ran, except the points of a sweep."""
    return [r for r in results["runs"] if r.get("status") == "ok" and r.get("sweep_value") is None]


def plot_per_task(results: dict, path: Path) -> Path:
    plt = _plt()
    tasks, refs = results["tasks"], results["references"]
    series = [("base", refs["base"]), ("experts", refs["experts"])]
    series += [(r["label"], r["scores"]) for r in _final_runs(results)]
    series.append(("multi-task", refs["multitask"]))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(tasks) + 0.25 * len(series) + 2), 4))
    width = 0.8 / len(series)
    for i, (label, scores) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [scores[t] for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(results["metric"])
    return _save(plt, fig, ax, path, f"{results['zoo']['name']}: per-task {results['metric']}", legend=7)


def plot_normalized(results: dict, path: Path) -> Path:
    plt = _plt()
    runs = _final_runs(results)
    best = sweep_best(results)
    labels = [r["label"] for r in runs] + [f"{b['method']} (best {b['best_value']:g})" for b in best]
    values = [r["normalized_average"] for r in runs] + [b["normalized_average"] for b in best]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 3), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    rr = results["reference_rows"]
    ax.axhline(rr["base"]["normalized_average"], color="grey", ls="--", label="base")
    ax.axhline(1.0, color="tab:green", ls="--", label="experts")
    ax.axhline(rr["multitask"]["normalized_average"], color="tab:purple", ls=":", label="multi-task")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("normalized score (avg over tasks)")
    return _save(plt, fig, ax, path, f"{results['zoo']['name']}: normalized score by method", legend=8)


def plot_sweep(results: dict, path: Path) -> Path | None:
    groups = sweep_groups(results)
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for g, rs in groups.items():
        ax.plot([r["sweep_value"] for r in rs], [r["normalized_average"] for r in rs], marker="o", label=g)
    ax.axhline(results["reference_rows"]["base"]["normalized_average"], color="grey", ls="--", label="base")
    ax.axhline(1.0, color="tab:green", ls="--", label="experts")
    ax.set_xlabel((results.get("sweep") or {}).get("param", "value"))
    ax.set_ylabel("normalized score (avg over tasks)")
    return _save(plt, fig, ax, path, f"{results['zoo']['name']}: sweep", legend=8)


def heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], title: str, path: Path,
            fmt: str = "{:.2f}", cmap: str = "viridis", vmin=None, vmax=None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(cols) + 2.5), max(3, 0.35 * len(rows) + 1.5)))
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if len(rows) * len(cols) <= 400:
        lo, hi = im.get_clim()
        for i, r in enumerate(matrix):
            for j, v in enumerate(r):
                pos = (v - lo) / (hi - lo) if hi > lo and not math.isnan(v) else 0.0
                light = 0.2 < pos < 0.8 if cmap == "coolwarm" else pos > 0.55  # is the cell's colour light?
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if light else "white")
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, ax, path, title)


# ------------------------------------------------------------------------------------------ html
def html_table(header: list[str], rows: Iterable[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}")


def write_html(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """A self-contained page (inline CSS, no scripts, images referenced by relative file name).
    ``sections``: (heading, html) pairs; use :func:`html_table`, :func:`html_img`, :func:`html_text`."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" if h else content for h, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return path


def html_img(name: str, alt: str) -> str:
    return f"<img src='{html.escape(name)}' alt='{html.escape(alt)}'>"


def html_text(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


# ---------------------------------------------------------------------------------------- folders
def check_out_dir(out: Path) -> None:
    """An existing non-empty folder is only replaced when it is a mergesmith report."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise MergeError(f"{out} exists and is not a mergesmith report folder; choose another --out")


class ReportFolder:
    """Context manager: yields a temporary folder beside ``out``; renames it to ``out`` on success."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()

    def __enter__(self) -> Path:
        check_out_dir(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        (self.tmp / MARKER).write_text("written by mergesmith; the whole folder is replaced on the next run\n")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """results.json, results.md, per_task.png, normalized.png, [sweep.png], index.html in ``out``."""
    out = Path(out)
    with ReportFolder(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
        (tmp / "results.md").write_text(markdown(results))
        images = [("per-task scores", plot_per_task(results, tmp / "per_task.png")),
                  ("normalized score by method", plot_normalized(results, tmp / "normalized.png"))]
        sweep = plot_sweep(results, tmp / "sweep.png")
        if sweep:
            images.append(("sweep", sweep))
        header, rows = table(results)
        z = results["zoo"]
        sections = [("", html_text(f"{z['description']}. {z['merge_note'].capitalize()}. Metric: "
                                   f"{results['metric']}; merge seed {results['seed']}.")),
                    ("Results", html_table(header, rows)),
                    ("Experts on every task", html_table(*expert_matrix_table(results)))]
        sections += [(title, html_img(p.name, title)) for title, p in images]
        write_html(tmp / "index.html", f"mergesmith bench: {z['name']}", sections)
    names = ["results.json", "results.md", "index.html"] + [p.name for _, p in images]
    return {n: out.resolve() / n for n in names}


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# --------------------------------------------------------------------------------------- inspect
def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def inspect_tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of an inspect result."""
    names, o = res["models"], res["overall"]
    n = len(names)
    tables = [("Task-vector norms per layer  (||tau|| and ||tau|| / ||theta_0||)",
               ["layer", "params", *names, "mean pairwise cos"],
               [[g, str(s["numel"]), *(f"{s['norm'][i]:.3g} ({_pct(s['relative_norm'][i])})" for i in range(n)),
                 "-" if math.isnan(s["mean_pairwise_cosine"]) else f"{s['mean_pairwise_cosine']:.3f}"]
                for g, s in res["layers"].items()]
               + [["all", str(o["numel"]), *(f"{o['norm'][i]:.3g} ({_pct(o['relative_norm'][i])})" for i in range(n)),
                   "-" if math.isnan(o["mean_pairwise_cosine"]) else f"{o['mean_pairwise_cosine']:.3f}"]])]
    if n >= 2:
        def mat(key, f):
            return [[names[i], *(f(o[key][i][j]) for j in range(n))] for i in range(n)]

        tables += [
            ("Cosine similarity of task vectors", ["", *names], mat("cosine", lambda v: f"{v:.3f}")),
            ("Sign conflicts (share of coordinates where both are non-zero with opposite signs)", ["", *names],
             mat("sign_conflict", _pct)),
            (f"Sign conflicts within the top-{100 * res['density']:g}% entries", ["", *names],
             mat("sign_conflict_topk", _pct)),
            (f"Top-{100 * res['density']:g}% overlap (Jaccard of the per-tensor top-k masks)", ["", *names],
             mat("topk_overlap", _pct)),
        ]
        hist = res["tall_histogram"]
        total = sum(hist) or 1
        tables.append((f"TALL-mask consensus (lambda={res['tall_lambda']:g}): tasks using each coordinate",
                       ["tasks", "coordinates", "share"],
                       [[str(k), str(v), _pct(v / total)] for k, v in enumerate(hist)]))
    return tables


def inspect_summary(res: dict) -> str:
    s = (f"{len(res['models'])} model(s) against base {res['base']}: {res['tensors']} tensors, "
         f"{res['parameters']:,} parameters compared")
    if len(res["models"]) >= 2:
        s += (f"; {_pct(res['sign_conflict_any_topk'])} of the coordinates kept by >= 2 trimmed task vectors "
              f"(top-{100 * res['density']:g}%) have conflicting signs (TIES)")
    if res["skipped"]:
        s += f"; {len(res['skipped'])} tensor(s) skipped (missing or different shapes)"
    return s + "."


def write_inspect_report(res: dict, out: Path) -> dict[str, Path]:
    """inspect.json, inspect.md, PNG heatmaps and index.html in ``out``."""
    out = Path(out)
    names, o = res["models"], res["overall"]
    layers = list(res["layers"])
    tables = inspect_tables(res)
    with ReportFolder(out) as tmp:
        (tmp / "inspect.json").write_text(json.dumps(res, indent=2))
        md = ["# mergesmith inspect", "", inspect_summary(res), ""]
        for title, header, rows in tables:
            md += [f"## {title}", "", markdown_table(header, rows), ""]
        (tmp / "inspect.md").write_text("\n".join(md))
        images = [("relative task-vector norm per layer", heatmap(
            [[s["relative_norm"][i] for i in range(len(names))] for s in res["layers"].values()], layers, names,
            "||tau|| / ||theta_0|| per layer", tmp / "norms.png", fmt="{:.2g}"))]
        if len(names) >= 2:
            images += [
                ("cosine similarity", heatmap(o["cosine"], names, names, "cosine similarity of task vectors",
                                              tmp / "cosine.png", cmap="coolwarm", vmin=-1, vmax=1)),
                ("sign conflicts (top-k)", heatmap(o["sign_conflict_topk"], names, names,
                                                   "sign-conflict rate within the top-k", tmp / "sign_conflict.png",
                                                   cmap="magma", vmin=0, vmax=1)),
                ("top-k overlap", heatmap(o["topk_overlap"], names, names, "top-k overlap (Jaccard)",
                                          tmp / "topk_overlap.png", cmap="viridis", vmin=0, vmax=1)),
                ("mean pairwise cosine per layer", heatmap(
                    [[s["mean_pairwise_cosine"]] for s in res["layers"].values()], layers, ["mean cos"],
                    "mean pairwise cosine per layer", tmp / "layer_cosine.png", fmt="{:.2f}", cmap="coolwarm",
                    vmin=-1, vmax=1)),
            ]
        sections = [("", html_text(inspect_summary(res)))]
        sections += [(title, html_table(header, rows)) for title, header, rows in tables]
        sections += [(title, html_img(p.name, title)) for title, p in images]
        write_html(tmp / "index.html", "mergesmith inspect: task-vector diagnostics", sections)
    names_out = ["inspect.json", "inspect.md", "index.html"] + [p.name for _, p in images]
    return {n: out.resolve() / n for n in names_out}
