"""The evaluation runner: every (sample, method, budget) answered from one prefill per sample, one JSON line each.

    from dapq.harness.runner import MethodSpec, run
    run(model, tok, samples, [MethodSpec("full"), MethodSpec("dapq")], budgets=[128, 256], out_dir="runs/x")

Rows carry the full config (model, method and its fields, budget, task, sample metadata, mode, versions), the
prediction, the score (0-100) and timings. The run folder, its locks and row I/O are `dapq.runs`; which methods
share a prefill is the engine's `derive_all`; this module only evaluates: a killed run resumes, every (sample,
method, budget) already written is skipped. The CLI (`dapq eval ...`) keys the output folder by the run's config,
so rerunning the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..checks import clean_label
from ..engine import append, derive_all, greedy_decode, merge
from ..errors import DapqError
from ..methods.base import Method, get_method, method_class
from ..prompts import stop_token_ids
from ..runs import RESULTS, RunConfig, RunLock, append_row, config_hash, done_keys, open_run, row_key
from ..safefile import open_append
from ..tasks.metrics import METRICS, score_prediction
from ..tasks.sample import Sample


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its non-budget parameters; `label` names it in reports (default: the name)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @classmethod
    def of(cls, name: str, label: str = "", **params: Any) -> MethodSpec:
        return cls(name, tuple(sorted(params.items())), label)

    @property
    def key(self) -> str:
        return self.label or (self.name + "".join(f",{k}={v}" for k, v in self.params))

    def build(self, budget: int | float | None) -> Method:
        return get_method(self.name, budget=budget, **dict(self.params))

    @property
    def uses_budget(self) -> bool:
        return method_class(self.name).evicts

    def for_model(self, model_config: Any) -> MethodSpec:
        """This spec with the parameters its method takes from the model (`Method.model_defaults`, e.g. `learned`'s
        shipped queries for that model) written out, so row keys and run.json record what ran; the reported key is
        unchanged (a plain `learned` stays `learned`)."""
        extra = method_class(self.name).model_defaults(dict(self.params), model_config)
        if not extra:
            return self
        return MethodSpec(self.name, tuple(sorted({**dict(self.params), **extra}.items())), self.key)


def for_model(methods: list[MethodSpec], model_config: Any) -> list[MethodSpec]:
    """`methods` resolved for the model with `model_config` (`MethodSpec.for_model`)."""
    return [spec.for_model(model_config) for spec in methods]


def with_method_files(config: RunConfig, methods: list[MethodSpec], budgets: list[int | float]) -> RunConfig:
    """`config` with the content hashes of the files the methods read (`Method.file_hashes`, e.g. learned queries)
    in `method_files` ({method key: {parameter: sha256}}): recorded in run.json, so a run folder never holds rows of
    two different files under one method key (rows carry the hash in their method_config too)."""
    files: dict[str, dict[str, str]] = {}
    for spec in methods:
        for budget in budgets if spec.uses_budget else [None]:
            hashes = spec.build(budget).file_hashes()
            if hashes:
                files.setdefault(spec.key, {}).update(hashes)
    if not files:
        return config
    return dataclasses.replace(config, method_files={**config.method_files, **files})


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "dapq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def decode_batches(caches: list[Any], max_rows: int, spread: int = 8) -> list[list[int]]:
    """Indices of `caches` grouped into decode batches: one layout per batch, at most `max_rows` rows, and caches
    sorted by length so that a batch's longest cache is at most `spread` times its shortest (merging pads every
    row to the longest, so FullKV does not decode next to a 64-token cache)."""

    def length(n: int) -> int:
        return max(layer.keys.shape[2] for layer in caches[n].cache.layers)

    batches: list[list[int]] = []
    by_layout: dict[type, list[int]] = {}
    for n, cc in enumerate(caches):
        by_layout.setdefault(type(cc.cache.layers[0]), []).append(n)
    for ids in by_layout.values():
        current: list[int] = []
        for n in sorted(ids, key=length):
            rows = sum(caches[m].first_logits.shape[0] for m in current)
            if current and (
                rows + caches[n].first_logits.shape[0] > max_rows or length(n) > spread * length(current[0])
            ):
                batches.append(current)
                current = []
            current.append(n)
        if current:
            batches.append(current)
    return batches


def run(
    model: Any,
    tokenizer: Any,
    samples: Iterable[Sample],
    methods: list[MethodSpec],
    budgets: list[int | float],
    out_dir: str | Path,
    *,
    config: RunConfig | None = None,
    console: Console | None = None,
    new_run: bool = False,
) -> Path:
    """Evaluate every sample with every method and budget; append rows to `out_dir/results.jsonl`; resume.

    The folder records its configuration (run.json); rerunning another configuration into it is refused (or, with
    `new_run=True`, goes to a new folder beside it). Returns the results file."""
    config = config or RunConfig(model="unknown")
    if config.mode not in ("query_aware", "question_agnostic"):
        raise DapqError(f"mode must be query_aware or question_agnostic; got {config.mode!r}")
    if not methods:
        raise DapqError("No methods to evaluate.")
    methods = for_model(methods, model.config)  # e.g. `learned`: the queries shipped for this model
    # every method x budget built (validated) before the long run starts; their fields are part of the resume key
    fields = method_fields(methods, budgets)
    config = with_method_files(config, methods, budgets).with_model(model)
    out = open_run(out_dir, config, new_run=new_run)
    with RunLock(out):
        return _run_locked(model, tokenizer, samples, methods, budgets, fields, out, config, console)


class _LoggedProgress(Progress):
    """A rich Progress that, on a console that is no terminal (a log file, `nohup`), also prints one plain line per
    task every `every` seconds and when the task finishes, where rich would print nothing until the end."""

    def __init__(self, *columns: Any, every: float = 60.0, **kwargs: Any):
        console = kwargs.get("console")
        if console is not None and not console.is_terminal:  # no live bar: rich would hold every line until the end
            kwargs["disable"] = True
        super().__init__(*columns, **kwargs)
        self.every = every
        self._printed: dict[Any, float] = {}  # task -> when its last line was printed
        self._ended: set[Any] = set()  # tasks whose final line is printed

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log_line(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id: Any) -> None:
        if not self.disable or task_id in self._ended:  # a terminal has the live bar
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if not task.finished and now - self._printed.setdefault(task_id, now) < self.every:
            return
        eta = task.time_remaining  # rich's, from the last 30 s: None when rows come further apart than that
        if eta is None and task.completed and task.total is not None and task.elapsed:
            eta = task.elapsed * (task.total - task.completed) / task.completed  # the whole run's mean rate
        tail = f", about {eta / 60:.1f} min left" if eta is not None and not task.finished else ""
        total = f"/{task.total:.0f}" if task.total is not None else ""
        elapsed = task.elapsed or 0.0
        self.console.print(f"{task.description}: {task.completed:.0f}{total} ({elapsed / 60:.1f} min{tail})")
        self.console.file.flush()  # a file's output is block-buffered: the line is meant to be read now
        self._printed[task_id] = now
        if task.finished:
            self._ended.add(task_id)


def add_sweep_task(progress: Progress, label: str, to_do: int, all_rows: int, path: Path) -> Any:
    """The sweep's one task: the rows this run writes. Rows a resumed run finds in `path` are named in one line,
    never counted as progress, so the rate and the time left are those of the rows written now."""
    if all_rows > to_do:
        progress.console.print(f"resuming: {all_rows - to_do} of {all_rows} rows are already in {escape(str(path))}")
    return progress.add_task(label, total=to_do)


def sweep_progress(console: Console, every: float = 60.0) -> Progress:
    """The one progress bar of a sweep: rows done of all, elapsed, ETA; on a console that is no terminal, a plain
    line every `every` seconds instead."""
    return _LoggedProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        every=every,
    )


def row_meta(config: RunConfig) -> dict[str, Any]:
    """The fields every row of a run carries besides its own results (model, mode, seed, versions, config id)."""
    return {
        "model": config.model,
        "mode": config.mode,
        "seed": config.seed,
        "versions": versions(),
        **config.extra,
        "config_id": config_hash(config.settings()),
    }


def method_fields(methods: list[MethodSpec], budgets: list[int | float]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every method x budget built (validated): their fields, part of the resume key."""
    return {
        (spec.key, json.dumps(budget)): dataclasses.asdict(spec.build(budget))
        for spec in methods
        for budget in (budgets if spec.uses_budget else [None])
    }


def rows_per_sample(methods: list[MethodSpec], budgets: list[int | float]) -> int:
    """How many rows each sample gets: one per budget of an evicting method, one for a method that keeps all."""
    return sum(len(budgets) if spec.uses_budget else 1 for spec in methods)


def todo_jobs(
    sample: Sample,
    methods: list[MethodSpec],
    budgets: list[int | float],
    fields: dict[tuple[str, str], dict[str, Any]],
    done: set[tuple],
) -> list[tuple[MethodSpec, int | float | None]]:
    """The (method, budget) pairs of `sample` not yet written."""
    return [
        (spec, budget)
        for spec in methods
        for budget in (budgets if spec.uses_budget else [None])
        if row_key(sample.id, spec.key, budget, fields[(spec.key, json.dumps(budget))]) not in done
    ]


@dataclass
class Job:
    """One (method, budget) of a sample: its spec and the built method (its cache comes from `derive_all`)."""

    spec: MethodSpec
    budget: int | float | None
    method: Method


def evaluate_sample(
    model: Any,
    tokenizer: Any,
    sample: Sample,
    todo: list[tuple[MethodSpec, int | float | None]],
    config: RunConfig,
    meta: dict[str, Any],
    stops: set[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of one sample for the given (method, budget) pairs, as they are decoded: the engine derives every
    method's cache from as few prefills as possible (`derive_all`), caches are decoded in batches. The
    single-process runner and every Ray worker call this, so their rows are the same."""
    if sample.metric not in METRICS:
        raise DapqError(f"Unknown metric {sample.metric!r}. Known: {', '.join(sorted(METRICS))}.")
    stops = stop_token_ids(tokenizer) if stops is None else stops
    ctx, q = sample.prompt_ids(tokenizer)
    prompts = [ctx + q] if config.mode == "query_aware" else [ctx]
    jobs = [Job(spec, budget, spec.build(budget)) for spec, budget in todo]
    derived = derive_all(
        model, tokenizer, prompts, [job.method for job in jobs], batch_lookahead=config.batch_lookahead
    )
    caches = [d.cache for d in derived]  # one per job, in the jobs' order
    for ids in decode_batches(caches, config.decode_batch):
        merged = merge([caches[n] for n in ids])
        start = time.perf_counter()
        if config.mode == "query_aware":
            logits = merged.first_logits
        else:  # question-agnostic: the question follows the compressed context
            logits = append(merged, [q] * len(ids), tokenizer.pad_token_id or 0)
        outputs = greedy_decode(merged, logits, sample.max_new_tokens, stops, compact=True)
        decode_s = (time.perf_counter() - start) / len(ids)
        for n, tokens in zip(ids, outputs):
            job = jobs[n]
            stats = caches[n].stats
            prediction = tokenizer.decode(tokens, skip_special_tokens=True)
            if sample.metadata.get("stop_on_newline"):  # greedy: cutting the text = stopping at "\n"
                prediction = prediction.split("\n", 1)[0]
            score = 100.0 * score_prediction(sample.metric, prediction, sample.references, sample.metadata)
            yield {
                "sample_id": sample.id,
                "task": sample.task,
                "method": job.spec.name,
                "method_key": job.spec.key,
                "method_config": dataclasses.asdict(job.method),
                "budget": job.budget,
                "prediction": prediction,
                "references": sample.references,
                "metric": sample.metric,
                "score": score,
                "prompt_tokens": len(prompts[0]) + (0 if config.mode == "query_aware" else len(q)),
                "kept_mean": stats["kept_mean"],
                "kv_bytes_compressed": stats["kv_bytes_compressed"],
                "kv_bytes_peak": stats["kv_bytes_peak"],  # accounted as `generate` accounts it
                "prefill_s": derived[n].prefill_s,
                "select_s": stats["select_s"],
                # a context pass (KVzip) and a draft (SpecKV) run before the first token: TTFT includes them
                "pass_s": stats.get("pass_s", 0.0),
                "draft_s": stats.get("draft_s", 0.0),
                "draft_kv_bytes_peak": stats.get("draft_kv_bytes_peak", 0),
                "decode_s": decode_s,
                "decode_batch": len(ids),
                "new_tokens": len(tokens),
                "metadata": sample.metadata,
                **meta,
            }


def _run_locked(
    model: Any,
    tokenizer: Any,
    samples: Iterable[Sample],
    methods: list[MethodSpec],
    budgets: list[int | float],
    fields: dict[tuple[str, str], dict[str, Any]],
    out: Path,
    config: RunConfig,
    console: Console | None,
) -> Path:
    path = out / RESULTS
    done = done_keys(path)
    samples = list(samples)
    stops = stop_token_ids(tokenizer)
    meta = row_meta(config)
    console = console or Console(stderr=True)
    to_do = sum(len(todo_jobs(sample, methods, budgets, fields, done)) for sample in samples)
    all_rows = len(samples) * rows_per_sample(methods, budgets)
    with open_append(path) as f, sweep_progress(console) as progress:
        task = add_sweep_task(progress, "eval", to_do, all_rows, path)
        for sample in samples:
            todo = todo_jobs(sample, methods, budgets, fields, done)  # again: rows written meanwhile count
            if not todo:
                continue
            progress.update(task, description=escape(clean_label(f"{sample.task} {sample.id}")))  # ids from data files
            for row in evaluate_sample(model, tokenizer, sample, todo, config, meta, stops):
                append_row(f, row)
                done.add(row_key(sample.id, row["method_key"], row["budget"], row["method_config"]))
                progress.advance(task)
    return path
