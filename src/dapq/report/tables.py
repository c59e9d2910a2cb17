"""Tables and figures from result files only (never from a model).

    dapq report runs/ruler-1a2b3c4d5e            # prints the tables, writes report.md and PNG figures there

Tables follow the paper's layout: one block per budget, one row per method (FullKV repeated in every block for
reference), one column per task, and an AVG column (the mean of the task columns); a run with several prompt
lengths (RULER at 2k and 4k) gets one section per length. NIAH runs also get heatmaps like
the paper's Figure 5 (depth x context length, red to green) and every run an accuracy-vs-budget plot.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..checks import clean_label
from ..errors import DapqError
from ..extras import require
from ..runs import RESULTS, RUN_FILE, load_rows
from ..safefile import save_figure, write_text
from ..tasks.metrics import row_score_max
from .markdown import LABEL_LIMIT, md_cell
from .paired import (
    DEFAULT_BOOT,
    PAIRED_HEADERS,
    REST,
    check_groups,
    paired,
    paired_cells,
    parse_group,
    parse_pair,
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_name(value: Any, limit: int = 80) -> str:
    """A file-name fragment from untrusted text (a row's method key, budget, ...): letters, digits and ._+=-
    only, no leading dot, never empty; so a name from a results file can never point outside the folder."""
    name = _UNSAFE.sub("_", str(value)).strip("._") or "x"
    return name[:limit]


def find_results(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise DapqError(f"{root} does not exist: pass a folder written by `dapq eval`.")
    if root.is_file():
        return [root]
    files = sorted(f for f in root.rglob(RESULTS) if f.is_file() and not f.is_symlink())
    if not files:
        raise DapqError(f"No {RESULTS} under {root}: pass a folder written by `dapq eval`.")
    return files


def load_all(path: str | Path) -> list[dict[str, Any]]:
    """Every row under `path` (read-only: a torn last line is skipped, not repaired), each tagged with its
    configuration (`_config`: the run.json settings of its folder, or what its rows say)."""
    return load_files(find_results(path))


#: the row fields shown as labels (tables, markdown, figure legends and titles), cleaned of control characters
LABELS = ("sample_id", "task", "method", "method_key", "metric")


def load_files(files: Iterable[Path]) -> list[dict[str, Any]]:
    """The rows of these results files, tagged with their configuration as `load_all` tags them."""
    rows = []
    for f in files:
        settings = _settings(f.parent)
        for row in load_rows(f, repair=False):
            if row.get("error"):  # a sample that failed twice on Ray (dapq.harness.scheduler): no result to report
                continue
            for label in LABELS:  # no terminal escape or bidi override from a file reaches a table or a figure
                if isinstance(row.get(label), str):
                    row[label] = clean_label(row[label], limit=LABEL_LIMIT)
            row["_config"] = settings if settings is not None else _row_settings(row)
            rows.append(row)
    return rows


def _settings(folder: Path) -> dict[str, Any] | None:
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        settings = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError):
        raise DapqError(f"{run_file} is not a dapq run file: delete it or move it away.") from None
    if not isinstance(settings, dict):
        raise DapqError(f"{run_file} is not a dapq run file: delete it or move it away.")
    return settings


def _row_settings(row: dict[str, Any]) -> dict[str, Any]:
    """A bare rows file's configuration: what its rows say (config_id: the hash of the run's settings, so rows of two
    configurations merged with `dapq merge --keep-apart` stay two groups)."""
    return {k: row.get(k) for k in ("model", "mode", "seed", "config_id") if row.get(k) is not None}


def config_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows split by configuration (model, dtype, mode, ...): (a one-line description, rows), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cfg = r.get("_config") or {}
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(r)
    out = []
    for key, items in groups.items():
        cfg = json.loads(key)
        shown = ("model", "model_id", "dtype", "device", "mode", "seed", "dapq")
        text = ", ".join(f"{k}={cfg[k]}" for k in shown if cfg.get(k) is not None) or "unknown configuration"
        extra = [f"{k}={v}" for k, v in sorted(cfg.items()) if k not in shown and v is not None]
        out.append((clean_label(text + (", " + ", ".join(extra) if extra else ""), limit=LABEL_LIMIT), items))
    return out


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


def task_average(tasks: list[str], means: dict[tuple, float], method: str, budget: Any) -> float | None:
    """The tables' AVG: the mean over `tasks` of (method, budget)'s per-task mean score (`summarize`'s means);
    None when one of the tasks has no score."""
    vals = [means.get((method, budget, t)) for t in tasks]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


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
        out.append([m, *[_fmt(v) for v in vals], _fmt(task_average(tasks, means, m, b))])
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
        lines.append("| method | " + " | ".join(md_cell(t) for t in tasks) + " | AVG |")
        lines.append("|---" * (len(tasks) + 2) + "|")
        for cells in _block(tasks, methods, budget, means):
            lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_tables(rows: list[dict[str, Any]], console: Console) -> None:
    tasks, methods, budgets, means = summarize(rows)
    for budget in budgets or [None]:
        table = Table(title=f"budget {budget}")
        for col in ["method", *tasks, "AVG"]:
            table.add_column(escape(col), justify="right" if col != "method" else "left")
        for cells in _block(tasks, methods, budget, means):
            table.add_row(*(escape(c) for c in cells))
        console.print(table)


def niah_heatmaps(rows: list[dict[str, Any]], out_dir: Path, prefix: str = "") -> list[Path]:
    """One PNG per (method, budget): depth (y) x context length (x), mean score, red (0) to green (the metric's best
    row score: 100, or 10 for the KVCache-Factory style's ROUGE-1 x 10)."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    niah = [r for r in rows if r["task"] == "niah"]
    for r in niah:
        md = r.get("metadata")
        if not isinstance(md, dict) or not all(
            isinstance(md.get(k), (int, float)) and not isinstance(md.get(k), bool) for k in ("length", "depth")
        ):
            raise DapqError(f"NIAH row {r['sample_id']!r} has no numeric metadata length/depth: fix or delete it.")
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
        vmax = max(row_score_max(r.get("metric")) for r in items)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=vmax, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth (%)")
        title = method if budget is None else f"{method}, budget {budget}"
        ax.set_title(f"{title}: mean {np.nanmean(grid):.1f}")
        fig.colorbar(im, ax=ax, label="score")
        fig.tight_layout()
        path = out_dir / f"{prefix}niah_{safe_name(method)}_{safe_name(budget)}.png"
        save_figure(fig, path)
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
        avg = task_average(tasks, means, m, None)
        if avg is not None:
            ax.axhline(avg, linestyle="--", color="gray", label=f"{m} ({avg:.1f})")
            continue
        xs, ys = [], []
        for b in budgets:
            avg = task_average(tasks, means, m, b)
            if avg is not None:
                xs.append(float(b))
                ys.append(avg)
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks([float(b) for b in budgets], [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget (tokens per head per layer)")
    ax.set_ylabel("average score")
    if ax.get_legend_handles_labels()[0]:  # rows with no score for any task average draw nothing to name
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{safe_name(name)}.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def write_report(
    path: str | Path,
    console: Console | None = None,
    pairs: Iterable[str] | None = None,
    n_boot: int = DEFAULT_BOOT,
    groups: Iterable[str] | None = None,
) -> Path:
    """Print the tables; write report.md and the figures into the results folder. `pairs` ('A,B' each): after each
    length's tables, A against B on the prompts both scored, with a paired-bootstrap interval (`dapq.report.paired`).
    `groups` ('NAME=task,task,...' each, with `pairs`): the same comparisons again within each group of tasks, and
    within the tasks no group names ("the rest")."""
    console = console or Console()
    rows = load_all(path)
    if not rows:
        raise DapqError(f"The results under {path} are empty.")
    present = list(dict.fromkeys(r["method_key"] for r in rows))
    compared = [parse_pair(text, present) for text in pairs or []]
    grouped = [parse_group(text) for text in groups or []]
    if grouped and not compared:
        raise DapqError("--group only goes with --paired A,B (the groups split the paired comparisons): add --paired.")
    check_groups(grouped, {task_label(r) for r in rows})
    out_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    configs = config_groups(rows)
    figures: list[Path] = []
    md = ""
    for n, (described, config_rows) in enumerate(configs, 1):
        prefix = f"config{n}_" if len(configs) > 1 else ""
        if len(configs) > 1:  # never one table over runs of different models, modes, ...
            console.print(f"[bold]Configuration {n}[/bold]: {escape(described)}")
            md += f"# Configuration {n}\n\n{md_cell(described)}\n\n"
        figures += niah_heatmaps(config_rows, out_dir, prefix)
        for length, group in length_groups(config_rows):
            if length is not None:
                console.print(f"[bold]{length}-token prompts[/bold]")
                md += f"## {length}-token prompts\n\n"
            print_tables(group, console)
            md += markdown_tables(group) + "\n"
            if compared:
                md += paired_tables(group, compared, console, n_boot) + "\n"
                for name, subset in task_groups(group, grouped):
                    md += paired_tables(subset, compared, console, n_boot, group=name) + "\n"
            name = f"{prefix}accuracy_vs_budget" + (f"_L{length}" if length is not None else "")
            curve = budget_curve(group, out_dir, name)
            if curve is not None:
                figures.append(curve)
    md += "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    report = out_dir / "report.md"
    write_text(report, md, "markdown")
    console.print(f"wrote {report} and {len(figures)} figure(s)")
    return report


def task_groups(
    rows: list[dict[str, Any]], groups: list[tuple[str, list[str]]]
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(group, its rows) for each group of tasks (`parse_group`) that has rows here, then (REST, the rows of every
    other task) when there are any; nothing when no group is given."""
    if not groups:
        return []
    named = {t for _, tasks in groups for t in tasks}
    parts = [(name, [r for r in rows if task_label(r) in tasks]) for name, tasks in groups]
    parts.append((REST, [r for r in rows if task_label(r) not in named]))
    out = []
    for name, subset in parts:
        if subset:
            tasks_here = sorted({task_label(r) for r in subset})
            out.append((f"{name} ({len(tasks_here)} tasks: {', '.join(tasks_here)})", subset))
    return out


def paired_tables(
    rows: list[dict[str, Any]],
    compared: list[tuple[str, str]],
    console: Console,
    n_boot: int = DEFAULT_BOOT,
    group: str | None = None,
) -> str:
    """Print and return (markdown) the paired comparisons of `compared` on these rows (one length of one config;
    `group`: the task group they are, named in the title)."""
    found = [p for a, b in compared for p in paired(rows, a, b, n_boot=n_boot)]
    where = f", task group {group}" if group else ""
    if not found:
        console.print(f"paired{escape(where)}: no prompt scored by both methods of a pair here")
        return ""
    table = Table(
        title=f"paired{escape(where)}: A - B on the prompts both scored ({n_boot} task-stratified bootstrap draws)"
    )
    for col in PAIRED_HEADERS:
        table.add_column(escape(col), justify="left" if col in ("A", "B") else "right")
    lines = [
        f"### Paired comparisons{md_cell(where)} (A - B on the prompts both scored; 95% interval of {n_boot} "
        "task-stratified paired bootstrap draws)",
        "",
        "| " + " | ".join(PAIRED_HEADERS) + " |",
        "|---" * len(PAIRED_HEADERS) + "|",
    ]
    for p in found:
        row = paired_cells(p)
        table.add_row(*(escape(c) for c in row))
        lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    console.print(table)
    return "\n".join(lines) + "\n"
