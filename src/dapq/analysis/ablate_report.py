"""The summaries of `dapq ablate` (the paper's Figure 4a/4b/4c, arXiv 2603.11564, Sec. 6): rows (dicts as written
by the runner) -> per variant and budget the mean score, the coefficient of variation of the content variants, a
markdown table, the figure and the output files. Works on rows copied from another machine; no torch."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DapqError
from ..extras import require
from ..safefile import ensure_dir, save_figure, write_text

if TYPE_CHECKING:
    from rich.console import Console

KINDS = ("content", "length", "position")
FIGURES = {"content": "Figure 4a", "length": "Figure 4b", "position": "Figure 4c"}
REFERENCE = "reference"
INSIDE = "inside the prompt"
SHIFTED = "shifted after it"
SNAPKV_LABEL = "SnapKV"
FULLKV_LABEL = "FullKV"


def check_kind(kind: str) -> None:
    """Fail on an ablation kind other than content, length and position."""
    if kind not in KINDS:
        raise DapqError(f"Unknown ablation {kind!r}; choose one of {', '.join(KINDS)}.")


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """Population standard deviation / mean (a fraction: 0.01 = 1%); None for fewer than 2 values or mean 0."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    if mean == 0:
        return None
    return statistics.pstdev(values) / abs(mean)


def budget_key(budget: Any) -> str:
    """The key of a budget in the summary: "128", "0.1", or "none" (FullKV)."""
    return "none" if budget is None else str(budget)


def _group(row: dict[str, Any], kind: str) -> str:
    if row.get("method") != "dapq":
        return REFERENCE
    if kind in ("content", "length"):
        return kind
    return INSIDE if (row.get("method_config") or {}).get("insert_part") is not None else SHIFTED


def _value(row: dict[str, Any], kind: str) -> Any:
    cfg = row.get("method_config") or {}
    if row.get("method") != "dapq":
        return None
    if kind == "content":
        return cfg.get("content")
    if kind == "length":
        return cfg.get("n_pseudo_tokens")
    part = cfg.get("insert_part")
    return f"part{part}" if part is not None else cfg.get("position_offset", 0)


def summarize(rows: Sequence[dict[str, Any]], kind: str, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean score and sample count per variant and budget, from runner rows.

    Returns {"kind", "figure", "budgets": [...], "variants": [{"label", "method", "group", "value",
    "scores": {budget_key: {"mean", "n"}}}, ...]} with the DapQ variants first (in `labels` order, else in order of
    appearance) and references last; for `content` also "cv": {budget_key: {"cv", "n_variants"}}, the coefficient of
    variation of the content variants' means at each budget.
    """
    check_kind(kind)
    acc: dict[str, dict[Any, list[float]]] = {}
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = r["method_key"]
        if labels is not None and key not in labels:
            continue
        acc.setdefault(key, {}).setdefault(r["budget"], []).append(float(r["score"]))
        first.setdefault(key, r)
    order = [k for k in (labels if labels is not None else list(acc)) if k in acc]
    order.sort(key=lambda k: _group(first[k], kind) == REFERENCE)  # stable: references last
    budgets = sorted({b for per in acc.values() for b in per if b is not None}, key=float)
    out_variants = []
    for key in order:
        per = acc[key]
        scores = {
            budget_key(b): {"mean": statistics.fmean(v), "n": len(v)}
            for b, v in sorted(per.items(), key=lambda kv: -1.0 if kv[0] is None else float(kv[0]))
        }
        out_variants.append(
            {
                "label": key,
                "method": first[key].get("method"),
                "group": _group(first[key], kind),
                "value": _value(first[key], kind),
                "scores": scores,
            }
        )
    summary: dict[str, Any] = {"kind": kind, "figure": FIGURES[kind], "budgets": budgets, "variants": out_variants}
    if kind == "content":
        cv = {}
        for b in budgets:
            means = [
                v["scores"][budget_key(b)]["mean"]
                for v in out_variants
                if v["group"] == "content" and budget_key(b) in v["scores"]
            ]
            cv[budget_key(b)] = {"cv": coefficient_of_variation(means), "n_variants": len(means)}
        summary["cv"] = cv
    return summary


def _cell(variant: dict[str, Any], budget: Any) -> dict[str, Any] | None:
    """The score of a variant at a budget; budget-free methods (FullKV) have the same score in every column."""
    scores = variant["scores"]
    return scores.get(budget_key(budget)) or scores.get("none")


def _fmt(cell: dict[str, Any] | None) -> str:
    return "-" if cell is None else f"{cell['mean']:.2f}"


def _table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    budgets = summary["budgets"] or [None]
    with_group = summary["kind"] == "position"
    header = ["variant", *(["group"] if with_group else []), "n"]
    header += [f"B={b}" if b is not None else "score" for b in budgets]
    body = []
    for v in summary["variants"]:
        counts = "/".join(str(n) for n in sorted({c["n"] for c in v["scores"].values()}))
        body.append([v["label"], *([v["group"]] if with_group else []), counts, *[_fmt(_cell(v, b)) for b in budgets]])
    return header, body


def _cv_text(summary: dict[str, Any]) -> str:
    parts = []
    for b, item in summary.get("cv", {}).items():
        cv = item["cv"]
        parts.append(f"B={b}: {'-' if cv is None else f'{100 * cv:.2f}%'} over {item['n_variants']} contents")
    return "; ".join(parts)


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (variant rows x budget columns, mean score 0-100) plus notes."""
    kind = summary["kind"]
    cfg = summary.get("config", {})
    lines = [f"## DapQ ablation: {kind} ({summary['figure']})", ""]
    described = []
    if cfg.get("task"):
        task = cfg["task"]
        described.append(f"task {', '.join(task) if isinstance(task, list) else task}")
    if cfg.get("samples"):
        described.append(f"{cfg['samples']} sample(s)")
    if cfg.get("n_pseudo"):
        described.append(f"N = {cfg['n_pseudo']}")
    if cfg.get("model"):
        described.append(f"model {cfg['model']}")
    lines.append("Mean score (0-100) per cache budget (B columns); n = samples per cell.")
    if described:
        lines += ["", "Setup: " + ", ".join(described) + "."]
    lines.append("")
    header, body = _table_rows(summary)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    lines.append("")
    if kind == "content" and summary.get("cv"):
        lines.append(f"Coefficient of variation (population std / mean) across content variants: {_cv_text(summary)}.")
        lines.append("")
    if summary.get("skipped"):
        lines += ["Skipped (could not be built for a budget or placed in a prompt):", ""]
        lines += [f"- {note}" for note in summary["skipped"]]
        lines.append("")
    return "\n".join(lines)


def print_table(summary: dict[str, Any], console: Console) -> None:
    """Print the summary table (rich) and, for content, the coefficient of variation."""
    from rich.markup import escape
    from rich.table import Table

    header, body = _table_rows(summary)
    table = Table(title=f"DapQ ablation: {summary['kind']} ({summary['figure']}), mean score")
    for col in header:
        table.add_column(col, justify="left" if col in ("variant", "group", "n") else "right")
    for cells in body:
        table.add_row(*(escape(c) for c in cells))
    console.print(table)
    if summary["kind"] == "content" and summary.get("cv"):
        console.print(f"coefficient of variation across contents: {escape(_cv_text(summary))}", highlight=False)


def figure(summary: dict[str, Any], path: str | Path) -> Path:
    """One panel per budget: bars (content), score vs N on a log2 axis (length), or bars grouped into inside the
    prompt / shifted after it (position); SnapKV and FullKV as horizontal reference lines. Returns the PNG path."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = summary["kind"]
    budgets = summary["budgets"] or [None]
    dapq_rows = [v for v in summary["variants"] if v["group"] != REFERENCE]
    refs = [v for v in summary["variants"] if v["group"] == REFERENCE]
    width = max(4.5, 0.55 * len(dapq_rows) + 2.0) if kind != "length" else 5.0
    fig, axes = plt.subplots(1, len(budgets), figsize=(width * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        present = [(v, c) for v in dapq_rows if (c := _cell(v, budget)) is not None]
        if kind == "length":
            present.sort(key=lambda vc: vc[0]["value"])
            xs = [float(v["value"]) for v, _ in present]
            ax.plot(xs, [c["mean"] for _, c in present], marker="o", color="C0", label="DapQ")
            ax.set_xscale("log", base=2)
            if xs:
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("pseudo queries N")
        else:
            xs, colors, names = [], [], []
            x, previous = 0.0, None
            for v, _ in present:
                if previous is not None and v["group"] != previous:
                    x += 0.8  # a gap between the two position groups
                xs.append(x)
                colors.append("C0" if v["group"] in ("content", INSIDE) else "C1")
                names.append(v["label"].removeprefix("dapq[").removesuffix("]"))
                previous = v["group"]
                x += 1.0
            bars = ax.bar(xs, [c["mean"] for _, c in present], color=colors, width=0.8)
            if kind == "position":
                for group, color in ((INSIDE, "C0"), (SHIFTED, "C1")):
                    idx = [n for n, (v, _) in enumerate(present) if v["group"] == group]
                    if idx:
                        bars[idx[0]].set_label(group)
                        ax.text(
                            sum(xs[n] for n in idx) / len(idx),
                            1.0,
                            group,
                            transform=ax.get_xaxis_transform(),
                            ha="center",
                            va="bottom",
                            fontsize=8,
                            color=color,
                        )
            ax.set_xticks(
                xs, names, rotation=40 if kind == "content" else 0, ha="right" if kind == "content" else "center"
            )
            ax.set_xlabel("pseudo-query content" if kind == "content" else "pseudo-query positions")
        for ref, style in zip(refs, ("--", ":")):
            cell = _cell(ref, budget)
            if cell is not None:
                ax.axhline(cell["mean"], linestyle=style, color="gray", label=f"{ref['label']} ({cell['mean']:.1f})")
        title = "no budget" if budget is None else f"budget {budget}"
        if kind == "content":
            cv = summary.get("cv", {}).get(budget_key(budget), {}).get("cv")
            title += "" if cv is None else f", CV {100 * cv:.1f}%"
        ax.set_title(title, pad=14 if kind == "position" else 6)
        ax.set_ylabel("mean score")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    fig.suptitle(f"DapQ ablation: {kind} ({summary['figure']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path


def write_outputs(
    rows: Sequence[dict[str, Any]],
    kind: str,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    labels: Sequence[str] | None = None,
    skipped: Sequence[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise `rows`; write ablate-<kind>.json, .md and .png into `out_dir`; print the table if a console is
    given. Returns the summary (with "skipped" notes and "config")."""
    if not rows:
        raise DapqError(f"No result rows for the {kind} ablation; nothing to summarise.")
    summary = summarize(rows, kind, labels)
    summary["skipped"] = list(skipped)
    summary["config"] = dict(config or {})
    out = ensure_dir(out_dir)
    stem = f"ablate-{kind}"
    write_text(out / f"{stem}.json", json.dumps(summary, indent=1, default=str), "json")
    write_text(out / f"{stem}.md", markdown(summary), "markdown")
    figure(summary, out / f"{stem}.png")
    if console is not None:
        print_table(summary, console)
    return summary
