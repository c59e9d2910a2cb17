"""Tables and figures from result files only (never from a model).

    dapq report runs/ruler-1a2b3c4d5e            # prints the tables, writes report.md and PNG figures there

Tables follow the paper's layout: one block per budget, one row per method (FullKV repeated in every block for
reference), one column per task, and an AVG column (the mean of the task columns); a run with several prompt
lengths (RULER at 2k and 4k) gets one section per length. NIAH runs also get heatmaps like
the paper's Figure 5 (depth x context length, red to green) and every run an accuracy-vs-budget plot.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import DapqError
from ..extras import require
from .runner import RESULTS, load_rows


def find_results(path: str | Path) -> list[Path]:
    root = Path(path)
    if root.is_file():
        return [root]
    files = sorted(root.rglob(RESULTS))
    if not files:
        raise DapqError(f"No {RESULTS} under {root}: pass a folder written by `dapq eval`.")
    return files


def load_all(path: str | Path) -> list[dict[str, Any]]:
    return [row for f in find_results(path) for row in load_rows(f)]


def task_label(row: dict[str, Any]) -> str:
    return row["task"].split("/", 1)[-1]


def summarize(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[Any], dict[tuple, float]]:
    """Mean score per (method_key, budget, task): returns tasks, methods, budgets and the means."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["method_key"], r["budget"], task_label(r))].append(float(r["score"]))
    means = {k: sum(v) / len(v) for k, v in acc.items()}
    tasks = sorted({k[2] for k in means})
    methods = list(dict.fromkeys(r["method_key"] for r in rows))
    budgets = sorted({k[1] for k in means if k[1] is not None}, key=float)
    return tasks, methods, budgets, means


def _fmt(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


def _block(tasks: list[str], methods: list[str], budget: Any, means: dict[tuple, float]) -> list[list[str]]:
    """Rows of one budget block; methods run without a budget (FullKV) appear in every block."""
    out = []
    for m in methods:
        b = None if any((m, None, t) in means for t in tasks) else budget
        vals = [means.get((m, b, t)) for t in tasks]
        if all(v is None for v in vals):
            continue
        avg = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        out.append([m, *[_fmt(v) for v in vals], _fmt(avg)])
    return out


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    tasks, methods, budgets, means = summarize(rows)
    counts = defaultdict(set)
    for r in rows:
        counts[task_label(r)].add(r["sample_id"])
    lines = [f"Samples per task: {', '.join(f'{t} {len(counts[t])}' for t in tasks)}", ""]
    for budget in budgets or [None]:
        lines.append(f"### Budget {budget}" if budget is not None else "### No budget")
        lines.append("")
        lines.append("| method | " + " | ".join(tasks) + " | AVG |")
        lines.append("|---" * (len(tasks) + 2) + "|")
        for cells in _block(tasks, methods, budget, means):
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_tables(rows: list[dict[str, Any]], console: Console) -> None:
    tasks, methods, budgets, means = summarize(rows)
    for budget in budgets or [None]:
        table = Table(title=f"budget {budget}")
        for col in ["method", *tasks, "AVG"]:
            table.add_column(col, justify="right" if col != "method" else "left")
        for cells in _block(tasks, methods, budget, means):
            table.add_row(*cells)
        console.print(table)


def niah_heatmaps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (method, budget): depth (y) x context length (x), mean score, red (0) to green (100)."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    niah = [r for r in rows if r["task"] == "niah"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in niah:
        groups[(r["method_key"], r["budget"])].append(r)
    paths = []
    for (method, budget), items in groups.items():
        lengths = sorted({r["metadata"]["length"] for r in items})
        depths = sorted({r["metadata"]["depth"] for r in items})
        grid = np.full((len(depths), len(lengths)), np.nan)
        cells: dict[tuple, list[float]] = defaultdict(list)
        for r in items:
            cells[(r["metadata"]["depth"], r["metadata"]["length"])].append(r["score"])
        for (d, n), v in cells.items():
            grid[depths.index(d), lengths.index(n)] = sum(v) / len(v)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(lengths) + 2), max(3, 0.35 * len(depths) + 1.5)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth (%)")
        title = method if budget is None else f"{method}, budget {budget}"
        ax.set_title(f"{title}: mean {np.nanmean(grid):.1f}")
        fig.colorbar(im, ax=ax, label="score")
        fig.tight_layout()
        path = out_dir / f"niah_{method.replace('/', '_').replace(',', '_')}_{budget}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def length_groups(rows: list[dict[str, Any]]) -> list[tuple[int | None, list[dict[str, Any]]]]:
    """Rows split by prompt length when a run holds several lengths of tasks other than NIAH (RULER at 2k and 4k,
    reported per length as in the paper); NIAH rows (whose lengths are heatmap columns) form the group `None`.
    A run of one length is one group `None`."""
    lengths = {(r.get("metadata") or {}).get("length") for r in rows if r["task"] != "niah"}
    if len(lengths) <= 1:
        return [(None, rows)]
    groups: dict[int | None, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[None if r["task"] == "niah" else (r.get("metadata") or {}).get("length")].append(r)
    return [(k, groups[k]) for k in sorted(groups, key=lambda k: (k is not None, k or 0))]


def budget_curve(rows: list[dict[str, Any]], out_dir: Path, name: str = "accuracy_vs_budget") -> Path | None:
    """Average score over tasks vs budget, one line per method (FullKV as a dashed reference line)."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods, budgets, means = summarize(rows)
    if not budgets:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        if all((m, None, t) in means for t in tasks):
            avg = sum(means[(m, None, t)] for t in tasks) / len(tasks)
            ax.axhline(avg, linestyle="--", color="gray", label=f"{m} ({avg:.1f})")
            continue
        xs, ys = [], []
        for b in budgets:
            vals = [means.get((m, b, t)) for t in tasks]
            if all(v is not None for v in vals):
                xs.append(float(b))
                ys.append(sum(vals) / len(vals))
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks([float(b) for b in budgets], [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget (tokens per head per layer)")
    ax.set_ylabel("average score")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(path: str | Path, console: Console | None = None) -> Path:
    """Print the tables; write report.md and the figures into the results folder."""
    console = console or Console()
    rows = load_all(path)
    if not rows:
        raise DapqError(f"The results under {path} are empty.")
    out_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    figures = niah_heatmaps(rows, out_dir)
    md = ""
    for length, group in length_groups(rows):
        if length is not None:
            console.print(f"[bold]{length}-token prompts[/bold]")
            md += f"## {length}-token prompts\n\n"
        print_tables(group, console)
        md += markdown_tables(group) + "\n"
        curve = budget_curve(group, out_dir, "accuracy_vs_budget" + (f"_L{length}" if length is not None else ""))
        if curve is not None:
            figures.append(curve)
    md += "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    report = out_dir / "report.md"
    report.write_text(md)
    console.print(f"wrote {report} and {len(figures)} figure(s)")
    return report
