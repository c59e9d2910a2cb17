"""`dapq ablate content|length|position`: the paper's DapQ ablations (Figure 4a/4b/4c, section 6).

    dapq ablate content                          # Fig. 4a: N = 32, content F4_L28, F8_L24, F2_L30, RS_C, RC_C, ...
    dapq ablate length --values 1,8,32,128       # Fig. 4b: N in {1, 2, ..., 128} (content 'auto')
    dapq ablate position --task ruler/niah_single_1 --lengths 4096 --budgets 64,128
                                                 # Fig. 4c: insert_part 1..3 (inside the prompt), offsets +0..+512

Every kind evaluates DapQ variants (labels such as `dapq[F4_L28]`, `dapq[N=8]`, `dapq[part1]`, `dapq[+32]`) plus
SnapKV and FullKV as reference rows through the evaluation harness (`dapq.harness.runner.run`: one results.jsonl,
resumable), then writes into the output folder (default runs/ablate-<kind>-<config hash>, so rerunning the same
command resumes it):

- ablate-<kind>.json: per variant and budget the mean score and the number of samples; for `content` also the
  coefficient of variation (population std / mean) of the content variants' means, which the paper reports as ~1%;
- ablate-<kind>.md: a markdown table, variant rows x budget columns, mean score (0-100);
- ablate-<kind>.png: bars (content), score vs N on a log2 axis (length), bars in two groups, inside the prompt and
  shifted after it (position); SnapKV and FullKV are horizontal reference lines.

A variant that cannot be built for a budget or a sample (e.g. SnapKV's window does not fit the budget, or
insert_part needs each third of the prompt to hold N positions) is skipped with a printed note, never a crash.

The summarising and plotting functions (`summarize`, `markdown`, `figure`, `write_outputs`) take rows (dicts as
written by the runner), so they also work on results copied from another machine. The command line is
`dapq.cli.ablate`; this module imports neither torch nor rich at its top level (the command's `--help` stays fast).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DapqError
from ..methods.protocols import PseudoSuffix
from ..safefile import ensure_dir, save_figure, write_text
from ..tasks.sample import Sample

if TYPE_CHECKING:  # the runner imports torch: imported where used, so that `dapq ablate --help` stays fast
    from rich.console import Console

    from ..harness.runner import MethodSpec
    from ..runs import RunConfig
from ..extras import require

KINDS = ("content", "length", "position")
FIGURES = {"content": "Figure 4a", "length": "Figure 4b", "position": "Figure 4c"}
DEFAULT_VALUES: dict[str, tuple[Any, ...]] = {
    "content": ("F4_L28", "F8_L24", "F2_L30", "RS_C", "RC_C", "Fix_C", "random_vocab"),
    "length": (1, 2, 4, 8, 16, 32, 64, 128),
    "position": ("part1", "part2", "part3", 0, 32, 64, 128, 256, 512),
}
VALUES_HELP = {
    "content": "comma-separated contents: F<m>_L<n> with m + n = N, RS_C, RC_C, Fix_C, random_vocab, auto",
    "length": "comma-separated pseudo-query counts N >= 1 (e.g. 1,8,32)",
    "position": "comma-separated part1, part2, part3 (inside the prompt) and offsets +0, +32, ... (after it)",
}
REFERENCE = "reference"
INSIDE = "inside the prompt"
SHIFTED = "shifted after it"
SNAPKV_LABEL = "SnapKV"
FULLKV_LABEL = "FullKV"
DEFAULT_LENGTH = 2000
DEFAULT_SAMPLES = 10


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: the method spec the runner evaluates, its group and its x value."""

    label: str  # the runner's method_key
    spec: MethodSpec
    group: str  # "content", "length", INSIDE, SHIFTED or REFERENCE
    value: Any = None  # content name, N, "part<k>" or the offset; None for references


# ---------------------------------------------------------------------------------------------------- variants
def check_kind(kind: str) -> None:
    """Fail on an ablation kind other than content, length and position."""
    if kind not in KINDS:
        raise DapqError(f"Unknown ablation {kind!r}; choose one of {', '.join(KINDS)}.")


def parse_values(kind: str, text: str) -> list[Any]:
    """Parse `--values` for `kind`: content names (str), N values (int) or positions ("part<k>" / int offsets)."""
    check_kind(kind)
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise DapqError(f"--values is empty; for {kind} it takes {VALUES_HELP[kind]}.")
    out: list[Any] = []
    for item in items:
        if kind == "content":
            value: Any = item
        elif kind == "length":
            try:
                value = int(item)
            except ValueError:
                raise DapqError(f"--values for length takes {VALUES_HELP[kind]}; got {item!r} in {text!r}.") from None
            if value < 1:
                raise DapqError(f"--values for length needs N >= 1; got {value} in {text!r}.")
        else:
            low = item.lower()
            if low.startswith("part"):
                if low[4:] not in ("1", "2", "3"):
                    raise DapqError(f"--values for position: parts are part1, part2 and part3; got {item!r}.")
                value = low
            else:
                try:
                    value = int(low)
                except ValueError:
                    raise DapqError(f"--values for position takes {VALUES_HELP[kind]}; got {item!r}.") from None
                if value < 0:
                    raise DapqError(
                        f"--values for position: offsets move the pseudo queries after the prompt, so "
                        f"they must be >= 0; got {item!r}."
                    )
        if value in out:
            raise DapqError(f"--values repeats {item!r}; every variant needs its own label.")
        out.append(value)
    return out


def default_values(kind: str, n_pseudo: int = 32) -> list[Any]:
    """The paper's variant list of `kind` (DEFAULT_VALUES), for N = 32; another N scales what depends on it: the
    F<m>_L<n> contents keep m = N/8, N/4, N/16 and the offsets stay multiples of N (0, N, 2N, 4N, 8N, 16N)."""
    check_kind(kind)
    if n_pseudo == 32 or kind == "length":
        return list(DEFAULT_VALUES[kind])
    if kind == "content":
        heads = dict.fromkeys((n_pseudo // 8, n_pseudo // 4, n_pseudo // 16))
        return [f"F{m}_L{n_pseudo - m}" for m in heads] + ["RS_C", "RC_C", "Fix_C", "random_vocab"]
    return ["part1", "part2", "part3", *[k * n_pseudo for k in (0, 1, 2, 4, 8, 16)]]


def _dapq_label(kind: str, value: Any) -> str:
    if kind == "content":
        return f"dapq[{value}]"
    if kind == "length":
        return f"dapq[N={value}]"
    return f"dapq[{value}]" if isinstance(value, str) else f"dapq[+{value}]"


def variants(
    kind: str,
    values: Sequence[Any] | None = None,
    *,
    n_pseudo: int = 32,
    seed: int = 0,
    snapkv_window: int = 32,
    references: bool = True,
) -> list[Variant]:
    """The DapQ variants of one ablation (default: `default_values`), then SnapKV and FullKV as references.

    content: N = `n_pseudo`, one variant per content; length: content 'auto', one variant per N; position: content
    'auto', N = `n_pseudo`, "part<k>" -> insert_part=k, an int -> position_offset. Every DapQ variant carries `seed`
    (it drives RS_C, RC_C, random_vocab and the insert_part spans). Raises DapqError for values DapQ rejects.
    """
    from ..harness.runner import MethodSpec

    check_kind(kind)
    values = list(default_values(kind, n_pseudo) if values is None else values)
    if not values:
        raise DapqError(f"No values for the {kind} ablation; pass {VALUES_HELP[kind]}.")
    out: list[Variant] = []
    for value in values:
        params: dict[str, Any] = {"seed": seed}
        if kind == "content":
            params.update(n_pseudo_tokens=n_pseudo, content=value)
            group = "content"
        elif kind == "length":
            params.update(n_pseudo_tokens=value, content="auto")
            group = "length"
        elif isinstance(value, str):
            params.update(n_pseudo_tokens=n_pseudo, content="auto", insert_part=int(value[4:]))
            group = INSIDE
        else:
            params.update(n_pseudo_tokens=n_pseudo, content="auto", position_offset=value)
            group = SHIFTED
        spec = MethodSpec.of("dapq", label=_dapq_label(kind, value), **params)
        try:
            spec.build(None)
        except DapqError as exc:
            raise DapqError(f"Bad value {value!r} for the {kind} ablation: {exc}") from None
        out.append(Variant(spec.label, spec, group, value))
    if references:
        out.append(Variant(SNAPKV_LABEL, MethodSpec.of("snapkv", label=SNAPKV_LABEL, window=snapkv_window), REFERENCE))
        out.append(Variant(FULLKV_LABEL, MethodSpec.of("full", label=FULLKV_LABEL), REFERENCE))
    return out


# ---------------------------------------------------------------------------------------------------- samples
#: The tasks an ablation can use: generated at each prompt length and scored (see `dapq.tasks`).
ABLATE_TASK_HELP = "niah (default) or ruler/<task> (e.g. ruler/niah_single_1)"


def ablation_tasks() -> list[str]:
    """Registry names an ablation can run on: niah and the RULER tasks."""
    from ..tasks import task_names

    return [*task_names("niah"), *task_names("ruler")]


def build_samples(
    tokenizer: Any, task: str, lengths: Sequence[int], n: int, seed: int = 0, data_dir: str | None = None
) -> list[Sample]:
    """Samples of `task`: "niah" (n depths per length, Kamradt grid) or "ruler/<task>" (n samples per length)."""
    from ..tasks import TaskArgs, task_samples

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DapqError(f"--samples must be an integer >= 1; got {n!r}")
    if not lengths:
        raise DapqError("--lengths is empty; pass prompt lengths in tokens, e.g. 2000 or 2000,4000.")
    check_task(task)
    return task_samples(tokenizer, task, TaskArgs(lengths=list(lengths), n=n, seed=seed, data_dir=data_dir))


def check_task(task: str) -> None:
    """Fail fast (before the model load) on a task an ablation cannot use (see `ablation_tasks`)."""
    from ..tasks import check_task as check

    check(task, ablation_tasks(), purpose="an ablation")


# ---------------------------------------------------------------------------------------------------- running
def plan(
    items: Sequence[Variant],
    samples: Sequence[Sample],
    tokenizer: Any,
    budgets: Sequence[int | float],
    vocab_size: int,
    mode: str = "query_aware",
) -> tuple[list[tuple[Variant, list[int | float]]], list[str]]:
    """Which variants run with which budgets, and notes for what is skipped.

    A (variant, budget) whose method cannot be built (DapqError) is dropped; a variant whose pseudo suffix cannot be
    placed for some sample (e.g. insert_part with a prompt third shorter than N) is dropped with all its budgets.
    """
    prompts = []
    for sample in samples:
        ctx, q = sample.prompt_ids(tokenizer)
        prompts.append((sample.id, ctx + q if mode == "query_aware" else ctx))
    runnable: list[tuple[Variant, list[int | float]]] = []
    notes: list[str] = []
    for item in items:
        ok: list[int | float] = []
        for budget in budgets if item.spec.uses_budget else [None]:
            try:
                method = item.spec.build(budget)
            except DapqError as exc:
                notes.append(f"skipped {item.label} at budget {budget}: {exc}")
                continue
            ok.append(budget)
        if not ok:
            continue
        method = item.spec.build(ok[0])
        try:
            for sid, prompt in prompts if isinstance(method, PseudoSuffix) else []:
                try:
                    method.pseudo_ids(list(prompt), vocab_size, tokenizer)
                    method.pseudo_positions(len(prompt))
                except DapqError as exc:
                    raise DapqError(f"{exc} (sample {sid}, {len(prompt)} prompt tokens)") from None
        except DapqError as exc:
            notes.append(f"skipped {item.label}: {exc}")
            continue
        runnable.append((item, [b for b in ok if b is not None] if item.spec.uses_budget else []))
    return runnable, notes


def run_ablation(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    kind: str,
    budgets: Sequence[int | float],
    out_dir: str | Path,
    *,
    values: Sequence[Any] | None = None,
    n_pseudo: int = 32,
    seed: int = 0,
    config: RunConfig | None = None,
    console: Console | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one ablation through the harness into `out_dir/results.jsonl` (resuming), write the JSON, markdown and
    PNG outputs, print the table, and return the summary (see `summarize`)."""
    from rich.console import Console
    from rich.markup import escape

    from ..harness.runner import run
    from ..runs import RESULTS, RunConfig, load_rows

    check_kind(kind)
    if not budgets:
        raise DapqError("--budgets is empty; pass token counts such as 128 or 64,128.")
    console = console or Console(stderr=True)
    config = config or RunConfig(model="unknown", seed=seed)
    config = dataclasses.replace(config, extra={**config.extra, "ablation": kind})
    items = variants(kind, values, n_pseudo=n_pseudo, seed=seed)
    samples = list(samples)
    if not samples:
        raise DapqError("No samples to evaluate.")
    vocab = model.get_input_embeddings().weight.shape[0]
    runnable, notes = plan(items, samples, tokenizer, list(budgets), vocab, config.mode)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if not runnable:
        raise DapqError(
            f"Every {kind} variant was skipped (see the notes above): use longer prompts or larger budgets."
        )
    out = Path(out_dir)
    groups: dict[tuple, list[MethodSpec]] = {}  # the runner takes one budget list: one call per distinct list
    for item, ok in runnable:
        groups.setdefault(tuple(ok) if item.spec.uses_budget else (), []).append(item.spec)
    if () in groups and len(groups) > 1:  # FullKV ignores the budget list: run it with the first group
        first = next(k for k in groups if k)
        groups[first] = groups[first] + groups.pop(())
    for group_budgets, specs in groups.items():
        run(model, tokenizer, samples, specs, list(group_budgets) or list(budgets), out, config=config, console=console)
    labels = [item.label for item, _ in runnable]
    ids, keep_budgets = {s.id for s in samples}, {json.dumps(b) for b in [*budgets, None]}
    rows = [  # only this command's variants, samples and budgets (an --out folder may hold older rows)
        r
        for r in load_rows(out / RESULTS)
        if r["method_key"] in labels and r["sample_id"] in ids and json.dumps(r["budget"]) in keep_budgets
    ]
    info = {
        "task": sorted({s.task for s in samples}),
        "samples": len(samples),
        "n_pseudo": n_pseudo if kind != "length" else None,
        "seed": seed,
        "model": config.model,
        "mode": config.mode,
        **(extra or {}),
    }
    return write_outputs(rows, kind, out, console=console, labels=labels, skipped=notes, config=info)


# ---------------------------------------------------------------------------------------------------- summaries
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
