"""The accuracy-memory-time front: every method and budget of one or more runs as a point (accuracy, peak KV, TTFT).

    dapq report --front runs/ruler-1a2b3c4d5e [more runs] [--ttft ttft.json] [--memory memory.json] [--out DIR]

`--ttft` and `--memory` repeat, one bench file per budget (each `dapq bench` run measures one budget).

One point per (method key, budget) and per prompt-length group (`report.length_groups`: RULER at 2k and 4k are two
groups, a NIAH run of mixed lengths is one group "all"), within one configuration (`report.config_groups`: runs of
different models are never mixed). FullKV's budget is "full".

- Accuracy: the tables' AVG (`report.task_average`: the mean over tasks of the per-task mean score).
- Peak: the measured peak of `dapq bench memory` (`peak_over_activations`: the allocator's peak during the compressing
  prefill above a plain forward's activations) for that method at that budget and the length nearest to the rows'
  mean prompt; else the rows' accounted KV peak, the mean of max(kv_bytes_peak, draft_kv_bytes_peak) (a draft's
  cache lives before the prefill's, never beside it).
- TTFT: `dapq bench ttft`'s median ttft_s, matched the same way; else the harness's own time before the first
  token, the mean of prefill_s + select_s + draft_s (+ pass_s when the context pass is not inside select_s). The
  harness's prefill is the recording shared by the methods of a sample (`dapq.engine.record`). A draft (SpecKV) runs
  before that prefill's clock starts (`suffix_key`), so draft_s is added; a context pass (KVzip) runs inside `derive`,
  so it is inside select_s of the budget whose derive ran it, and only memoised at its other budgets (there select_s
  is the selection alone, shorter than pass_s, and pass_s is added). Never inside prefill_s.
- The front: the points that no other point matches or beats on all three (accuracy higher or equal, peak and TTFT
  lower or equal) while beating them on one. Equal points are both on it.

Writes front.md and one PNG per group (front.png, or front_L2048.png, front_all.png, ... and config<n>_ prefixes
for several configurations) into `out` (default: the first run folder); prints the tables.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import DapqError
from ..extras import require
from ..runs import row_key
from ..safefile import ensure_dir, save_figure, write_text
from .benches import Benches, bench_value, load_benches
from .markdown import md_cell
from .tables import (
    config_groups,
    find_results,
    length_groups,
    load_files,
    safe_name,
    summarize,
    task_average,
)

MiB = 2**20
PEAK_MARK, TTFT_MARK = "†", "‡"


@dataclass
class Point:
    """One method at one budget in one group: what the table shows and the figure draws."""

    method: str
    budget: Any  # None: FullKV
    accuracy: float
    peak_bytes: float
    ttft_s: float
    samples: int
    peak_measured: bool = False  # from --memory (else the rows' accounted peak)
    ttft_measured: bool = False  # from --ttft (else the harness's timings)
    peak_length: int | None = None  # the bench length the measured value comes from
    ttft_length: int | None = None
    on_front: bool = False

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)

    @property
    def name(self) -> str:
        return self.method if self.budget is None else f"{self.method} {self.budget_label}"


@dataclass
class Group:
    """The points of one (configuration, prompt length) group and what the table says about them."""

    title: str
    file_stem: str
    points: list[Point]
    tasks: list[str]
    left_out: list[str]
    prompt_tokens: float | None


def budget_label(budget: Any) -> str:
    """ "full" for FullKV (no budget), else the budget as written (128, 0.1)."""
    return "full" if budget is None else f"{budget:g}"


def pareto(values: Sequence[tuple[float, ...]], directions: Sequence[int] = (1, -1, -1)) -> list[bool]:
    """Which of `values` no other value dominates; `directions`: +1 where higher is better, -1 where lower is
    (default: accuracy, peak, TTFT). Equal values never dominate each other."""

    def key(v: tuple[float, ...]) -> tuple[float, ...]:  # everything as "lower is better"
        return tuple(-d * x for d, x in zip(directions, v))

    keyed = [key(v) for v in values]

    def beats(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(beats(other, mine) for other in keyed) for mine in keyed]


def _number(row: dict[str, Any], field: str, default: float | None = None) -> float:
    value = row.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        if field not in row and default is None:
            raise DapqError(
                f"Row {row.get('sample_id')!r} ({row.get('method_key')}) has no {field!r} (written by an older "
                f"dapq?): pass --{'memory' if 'peak' in field else 'ttft'} FILE, or rerun the run."
            )
        raise DapqError(f"Row {row.get('sample_id')!r} has a non-numeric {field!r}: {value!r}; fix or delete it.")
    return float(value)


def row_peak(row: dict[str, Any]) -> float:
    """A row's accounted peak KV bytes: the engine's kv_bytes_peak, or a draft's cache when that is larger."""
    return max(_number(row, "kv_bytes_peak"), _number(row, "draft_kv_bytes_peak", 0.0))


def row_ttft(row: dict[str, Any]) -> float:
    """A row's harness TTFT in seconds: prefill_s + select_s + draft_s, + pass_s when the context pass is not inside
    select_s (it is whenever select_s >= pass_s: the pass ran inside that selection's clock)."""
    select, pass_s = _number(row, "select_s"), _number(row, "pass_s", 0.0)
    return _number(row, "prefill_s") + select + _number(row, "draft_s", 0.0) + (pass_s if pass_s > select else 0.0)


def row_prompt_tokens(row: dict[str, Any]) -> float | None:
    md = row.get("metadata") or {}
    for value in (row.get("prompt_tokens"), md.get("prompt_tokens"), md.get("length")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def group_points(
    rows: list[dict[str, Any]], ttft: Benches | None = None, memory: Benches | None = None
) -> tuple[list[Point], list[str], list[str]]:
    """The points of one group of rows (one configuration, one length group), the front marked; also the tasks and
    the (method, budget) names left out because a task has no score for them."""
    tasks, methods, _budgets, means = summarize(rows)
    by: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["method_key"], r["budget"])].append(r)
    points, left_out = [], []
    for (method, budget), items in by.items():
        accuracy = task_average(tasks, means, method, budget)
        if accuracy is None:
            left_out.append(method if budget is None else f"{method} {budget_label(budget)}")
            continue
        known = [t for t in (row_prompt_tokens(r) for r in items) if t is not None]
        tokens = sum(known) / len(known) if known else None
        point = Point(method, budget, accuracy, 0.0, 0.0, len({(r["task"], r["sample_id"]) for r in items}))
        peak = bench_value(memory, method, budget, tokens)
        if peak is not None:
            point.peak_bytes, point.peak_length, point.peak_measured = peak[0], peak[1], True
        else:
            point.peak_bytes = sum(row_peak(r) for r in items) / len(items)
        first = bench_value(ttft, method, budget, tokens)
        if first is not None:
            point.ttft_s, point.ttft_length, point.ttft_measured = first[0], first[1], True
        else:
            point.ttft_s = sum(row_ttft(r) for r in items) / len(items)
        points.append(point)
    for p, on in zip(points, pareto([(p.accuracy, p.peak_bytes, p.ttft_s) for p in points])):
        p.on_front = on
    order = {m: n for n, m in enumerate(methods)}
    points.sort(key=lambda p: (-p.accuracy, p.peak_bytes, p.ttft_s, order.get(p.method, 0), float(p.budget or 0)))
    return points, tasks, left_out


def bench_of(row: dict[str, Any]) -> str:
    """The benchmark a row comes from (its `bench` field, else its task's family: ruler/vt -> ruler)."""
    bench = row.get("bench")
    return bench if isinstance(bench, str) and bench else row["task"].split("/", 1)[0]


def common_samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the samples that every (method, budget) of `rows` scored (the same prompts behind each point)."""
    by: dict[tuple[str, Any], set[str]] = defaultdict(set)
    for r in rows:
        by[(r["method_key"], json.dumps(r["budget"]))].add(r["sample_id"])
    shared = set.intersection(*by.values()) if by else set()
    return [r for r in rows if r["sample_id"] in shared]


def front_groups(
    rows: list[dict[str, Any]],
    ttft: Benches | None = None,
    memory: Benches | None = None,
    same_samples: bool = False,
) -> list[Group]:
    """Rows split by configuration, benchmark (never one AVG over NIAH and RULER, even from folders without
    run.json) and prompt length; each group's points with its front marked. `same_samples`: each group keeps only
    the samples every one of its points scored."""
    configs = config_groups(rows)
    out = []
    for n, (described, config_rows) in enumerate(configs, 1):
        benches: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in config_rows:
            benches[bench_of(r)].append(r)
        for bench, bench_rows in benches.items():
            prefix = (f"config{n}_" if len(configs) > 1 else "") + (f"{bench}_" if len(benches) > 1 else "")
            lengths = length_groups(bench_rows)
            for length, group in lengths:
                if same_samples:
                    group = common_samples(group)
                points, tasks, left_out = group_points(group, ttft, memory)
                if not points:
                    continue
                seen = {(r.get("metadata") or {}).get("length") for r in group}
                shown = length if length is not None else (next(iter(seen)) if len(seen) == 1 else None)
                title = (f"Configuration {n} ({described}), " if len(configs) > 1 else "") + (
                    f"{bench}, " if len(benches) > 1 else ""
                )
                title += f"{shown}-token prompts" if shown is not None else "all prompt lengths"
                suffix = (f"_L{length}" if length is not None else "_all") if len(lengths) > 1 else ""
                known = [t for t in (row_prompt_tokens(r) for r in group) if t is not None]
                mean_tokens = sum(known) / len(known) if known else None
                out.append(Group(title, safe_name(prefix + "front" + suffix), points, tasks, left_out, mean_tokens))
    return out


# ---------------------------------------------------------------------------------------------------- tables
def _headers(ttft: Benches | None, memory: Benches | None) -> tuple[str, str]:
    peak = "measured peak MiB (bench memory)" if memory is not None else "accounted KV peak MiB"
    first = "measured TTFT s (bench ttft)" if ttft is not None else "harness TTFT s (shared prefill)"
    return peak, first


def _cells(p: Point, ttft: Benches | None, memory: Benches | None) -> list[str]:
    peak = f"{p.peak_bytes / MiB:.2f}" + (PEAK_MARK if memory is not None and not p.peak_measured else "")
    first = f"{p.ttft_s:.3f}" + (TTFT_MARK if ttft is not None and not p.ttft_measured else "")
    return [p.method, p.budget_label, f"{p.accuracy:.2f}", peak, first, str(p.samples), "yes" if p.on_front else ""]


def _notes(group: Group, ttft: Benches | None, memory: Benches | None) -> list[str]:
    front = ", ".join(p.name for p in group.points if p.on_front)
    lines = [
        f"Front (no other point as good on accuracy, peak and TTFT and better on one): {front}.",
        f"Accuracy: the AVG over {len(group.tasks)} task(s) ({', '.join(group.tasks)}) of the per-task mean score.",
    ]
    for bench, kind, mark, used, fallback in (
        (memory, "memory", PEAK_MARK, "peak_length", "the rows' accounted KV peak (kv_bytes_peak, or the draft's)"),
        (ttft, "ttft", TTFT_MARK, "ttft_length", "the harness TTFT (prefill_s + select_s + draft_s + pass_s)"),
    ):
        if bench is None:
            continue
        lengths = sorted({getattr(p, used) for p in group.points if getattr(p, used) is not None})
        prompt = f"; the rows' prompts: {group.prompt_tokens:.0f} tokens on average" if group.prompt_tokens else ""
        files = ", ".join(f"{Path(b['_path']).name} (budget {b['budget']})" for b in bench)
        lines.append(
            f"{kind.upper() if kind == 'ttft' else 'Peak'}: {files} at "
            f"{', '.join(str(n) for n in lengths) or '-'} tokens, the nearest measured length{prompt}."
        )
        if any(not getattr(p, used.replace("_length", "_measured")) for p in group.points):
            names = ", ".join(Path(b["_path"]).name for b in bench)
            lines.append(f"{mark} not measured in {names} for this method and budget: {fallback}.")
    if ttft is None:
        lines.append(
            "Harness TTFT: the mean of prefill_s (the sample's shared recording) + select_s + draft_s, + pass_s "
            "where the context pass is not inside select_s."
        )
    if group.left_out:
        lines.append(f"Left out (not every task scored): {', '.join(group.left_out)}.")
    return lines


def markdown_table(group: Group, ttft: Benches | None = None, memory: Benches | None = None) -> str:
    """One group's table (sorted by accuracy, best first), the front's members and the notes, as markdown."""
    peak, first = _headers(ttft, memory)
    head = ["method", "budget", "accuracy", peak, first, "n samples", "front"]
    table = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    table += ["| " + " | ".join(md_cell(c) for c in _cells(p, ttft, memory)) + " |" for p in group.points]
    return "\n\n".join(["\n".join(table), *(md_cell(n) for n in _notes(group, ttft, memory))])


def print_table(group: Group, console: Console, ttft: Benches | None = None, memory: Benches | None = None) -> None:
    peak, first = _headers(ttft, memory)
    table = Table(title=escape(group.title))
    for col in ["method", "budget", "accuracy", peak, first, "n samples", "front"]:
        left = col == "method"
        table.add_column(escape(col), justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for p in group.points:
        table.add_row(*(escape(c) for c in _cells(p, ttft, memory)))
    console.print(table)
    for note in _notes(group, ttft, memory):
        console.print(escape(note))


# ---------------------------------------------------------------------------------------------------- figure
def front_figure(group: Group, path: Path, ttft: Benches | None = None, memory: Benches | None = None) -> Path:
    """Two panels: accuracy vs peak MiB and accuracy vs TTFT s; one marker and colour per method, budgets written
    beside the points, the points on the (three-way) front circled, each panel's own two-way front as a step line."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak_label, ttft_label = _headers(ttft, memory)
    methods = list(dict.fromkeys(p.method for p in group.points))
    markers = "osD^vP*X<>hp"
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, attr, label in ((axes[0], "peak", peak_label), (axes[1], "ttft", ttft_label)):
        xs = [p.peak_bytes / MiB if attr == "peak" else p.ttft_s for p in group.points]
        ys = [p.accuracy for p in group.points]
        for n, m in enumerate(methods):
            sel = [i for i, p in enumerate(group.points) if p.method == m]
            ax.scatter(
                [xs[i] for i in sel],
                [ys[i] for i in sel],
                marker=markers[n % len(markers)],
                color=colours(n % 10),
                s=45,
                zorder=3,
                label=m if ax is axes[0] else None,
            )
        for x, y, p in zip(xs, ys, group.points):
            ax.annotate(p.budget_label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        on = [i for i, p in enumerate(group.points) if p.on_front]
        ax.scatter(
            [xs[i] for i in on],
            [ys[i] for i in on],
            s=220,
            facecolors="none",
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
            label="on the front (all three)" if ax is axes[0] else None,
        )
        flat = pareto([(y, x) for x, y in zip(xs, ys)], (1, -1))
        line = sorted((x, y) for x, y, f in zip(xs, ys, flat) if f)
        ax.step([x for x, _ in line], [y for _, y in line], where="post", color="gray", linestyle="--", zorder=2)
        positive = [x for x in xs if x > 0]
        if positive and len(positive) == len(xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.set_title(f"accuracy vs {'peak' if attr == 'peak' else 'TTFT'} (dashed: this panel's front)", fontsize=9)
    axes[0].set_ylabel("accuracy (AVG over tasks)")
    axes[0].legend(fontsize=7)
    fig.suptitle(group.title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- writer
def load_runs(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], int]:
    """The rows of every results file under `paths` (a file under two paths read once); a row of the same sample,
    method, budget and configuration in several runs counted once. Returns (rows, duplicates dropped)."""
    files: dict[Path, Path] = {}
    for path in paths:
        for f in find_results(path):
            files.setdefault(f.resolve(), f)
    rows, seen, dropped = [], set(), 0
    for r in load_files(files.values()):
        key = (
            json.dumps(r.get("_config"), sort_keys=True, default=str),
            *row_key(r["sample_id"], r["method_key"], r["budget"], r.get("method_config")),
        )
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        rows.append(r)
    return rows, dropped


def write_front(
    paths: Sequence[str | Path],
    *,
    ttft: str | Path | Sequence[str | Path] | None = None,
    memory: str | Path | Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
    same_samples: bool = False,
    methods: Sequence[str] | None = None,
) -> Path:
    """Print the front tables of the runs under `paths`; write front.md and the figures into `out` (default: the
    first run folder). Returns front.md's path. `methods`: only these method keys' points (before `same_samples`
    picks the shared samples, so a method scored on fewer samples does not shrink the others')."""
    console = console or Console()
    if not paths:
        raise DapqError("Pass at least one results folder written by `dapq eval`.")
    ttft_data = load_benches(ttft, "ttft")
    memory_data = load_benches(memory, "memory")
    rows, dropped = load_runs(paths)
    if methods:
        present = list(dict.fromkeys(r["method_key"] for r in rows))
        missing = [m for m in methods if m not in present]
        if missing:
            raise DapqError(
                f"--methods: no rows of {', '.join(missing)} under {', '.join(map(str, paths))}. "
                f"Methods there: {', '.join(present)}."
            )
        wanted = set(methods)
        rows = [r for r in rows if r["method_key"] in wanted]
    groups = front_groups(rows, ttft_data, memory_data, same_samples)
    if not groups:
        raise DapqError(
            f"No scored rows with every task under {', '.join(map(str, paths))}: run `dapq eval` into it first."
        )
    first = Path(paths[0])
    out_dir = Path(out) if out is not None else (first if first.is_dir() else first.parent)
    ensure_dir(out_dir, "--out")
    md = ["# Accuracy, peak KV and TTFT", "", f"Runs: {', '.join(md_cell(p) for p in paths)}", ""]
    if methods:
        md += [f"Methods: {', '.join(md_cell(m) for m in methods)} (the others of these runs left out).", ""]
    if same_samples:
        md += ["Every point of a table is measured on the same samples (those all its points scored).", ""]
    if dropped:
        note = (
            f"{dropped} duplicate row(s) (same sample, method, budget and configuration in several runs) counted once."
        )
        console.print(note)
        md += [note, ""]
    for group in groups:
        figure = front_figure(group, out_dir / f"{group.file_stem}.png", ttft_data, memory_data)
        if len(groups) > 1:
            md += [f"## {md_cell(group.title)}", ""]
        print_table(group, console, ttft_data, memory_data)
        md += [markdown_table(group, ttft_data, memory_data), "", f"![{figure.stem}]({figure.name})", ""]
    report = out_dir / "front.md"
    write_text(report, "\n".join(md), "markdown")
    console.print(f"wrote {report} and {len(groups)} figure(s)")
    return report
