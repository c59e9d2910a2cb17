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

The summarising and plotting functions (`dapq.analysis.ablate_report`: `summarize`, `markdown`, `figure`,
`write_outputs`) take rows (dicts as written by the runner), so they also work on results copied from another
machine. The command line is `dapq.cli.ablate`; this module imports neither torch nor rich at its top level (the
command's `--help` stays fast).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DapqError
from ..methods.protocols import PseudoSuffix
from ..tasks.sample import Sample
from .ablate_report import (
    FULLKV_LABEL,
    INSIDE,
    REFERENCE,
    SHIFTED,
    SNAPKV_LABEL,
    check_kind,
    write_outputs,
)

if TYPE_CHECKING:  # the runner imports torch: imported where used, so that `dapq ablate --help` stays fast
    from rich.console import Console

    from ..harness.runner import MethodSpec
    from ..runs import RunConfig

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
