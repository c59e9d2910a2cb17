"""The evaluation runner: every (sample, method, budget) answered from one prefill per sample, one JSON line each.

    from dapq.bench.runner import MethodSpec, run
    run(model, tok, samples, [MethodSpec("full"), MethodSpec("dapq")], budgets=[128, 256], out_dir="runs/x")

Rows carry the full config (model, method and its fields, budget, task, sample metadata, mode, versions), the
prediction, the score (0-100) and timings. Rows are appended with flush + fsync; a run killed at any point (even
`kill -9` mid-write) resumes without losing or duplicating rows: a torn last line is cut off on restart and every
(sample, method, budget) already written is skipped. The CLI (`dapq eval ...`) keys the output folder by the run's
config, so rerunning the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..engine import append, derive, greedy_decode, merge, record, suffix_key
from ..errors import DapqError
from ..methods.base import Method, get_method
from ..methods.protocols import pseudo_length
from ..prompts import stop_token_ids
from .base import Sample

RESULTS = "results.jsonl"


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
        return self.name != "full"


@dataclass
class RunConfig:
    model: str
    mode: str = "query_aware"
    seed: int = 0
    decode_batch: int = 16  # methods (caches of similar length, padded) decode together, up to this many rows
    extra: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "dapq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able run config (names the output folder)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def row_key(sample_id: str, method_key: str, budget: Any) -> tuple[str, str, str]:
    return (sample_id, method_key, json.dumps(budget))


def load_rows(path: Path) -> list[dict[str, Any]]:
    """All complete rows of a results file; a torn last line (a run killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
    rows = []
    for line in data[:good_end].splitlines():
        if line.strip():
            rows.append(json.loads(line))
    if good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def _append_row(f: Any, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


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
    total: int | None = None,
) -> Path:
    """Evaluate every sample with every method and budget; append rows to `out_dir/results.jsonl`; resume."""
    from .metrics import METRICS, score_prediction

    config = config or RunConfig(model="unknown")
    if config.mode not in ("query_aware", "question_agnostic"):
        raise DapqError(f"mode must be query_aware or question_agnostic; got {config.mode!r}")
    if not methods:
        raise DapqError("No methods to evaluate.")
    for spec in methods:  # validate every method x budget before the long run starts
        for budget in budgets if spec.uses_budget else [None]:
            spec.build(budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = {row_key(r["sample_id"], r["method_key"], r["budget"]) for r in load_rows(path)}
    samples = list(samples)
    stops = stop_token_ids(tokenizer)
    meta = {"model": config.model, "mode": config.mode, "seed": config.seed, "versions": versions(), **config.extra}
    console = console or Console(stderr=True)
    jobs_per_sample = sum(len(budgets) if s.uses_budget else 1 for s in methods)
    with (
        open(path, "a", encoding="utf-8") as f,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("eval", total=(total or len(samples)) * jobs_per_sample)
        for sample in samples:
            todo = [
                (spec, budget)
                for spec in methods
                for budget in (budgets if spec.uses_budget else [None])
                if row_key(sample.id, spec.key, budget) not in done
            ]
            progress.advance(task, jobs_per_sample - len(todo))
            if not todo:
                continue
            progress.update(task, description=f"{sample.task} {sample.id}")
            ctx, q = sample.prompt_ids(tokenizer)
            prompts = [ctx + q] if config.mode == "query_aware" else [ctx]
            built = [(spec, budget, spec.build(budget)) for spec, budget in todo]
            # record with a pseudo suffix first: methods without one can reuse that prefill (no second recording)
            built.sort(key=lambda job: pseudo_length(job[2]) == 0)
            recordings: dict[tuple, Any] = {}
            vocab = model.get_input_embeddings().weight.shape[0]
            prefill_s: dict[tuple, float] = {}
            jobs = []  # (spec, budget, method, compressed cache, recording key)
            for spec, budget, method in built:
                skey = suffix_key(method, prompts, vocab, tokenizer)
                if skey not in recordings and not (skey == () and recordings):
                    start = time.perf_counter()
                    recordings[skey] = record(model, tokenizer, prompts, suffix=method if skey else None)
                    prefill_s[skey] = time.perf_counter() - start
                rec_key = skey if skey in recordings else next(iter(recordings))
                jobs.append((spec, budget, method, derive(recordings[rec_key], method), rec_key))
            batches = decode_batches([job[3] for job in jobs], config.decode_batch)
            for ids in batches:
                merged = merge([jobs[n][3] for n in ids])
                start = time.perf_counter()
                if config.mode == "query_aware":
                    logits = merged.first_logits
                else:  # question-agnostic: the question follows the compressed context
                    logits = append(merged, [q] * len(ids), tokenizer.pad_token_id or 0)
                outputs = greedy_decode(merged, logits, sample.max_new_tokens, stops, compact=True)
                decode_s = (time.perf_counter() - start) / len(ids)
                for n, tokens in zip(ids, outputs):
                    spec, budget, method, cc, rec_key = jobs[n]
                    prediction = tokenizer.decode(tokens, skip_special_tokens=True)
                    if sample.metadata.get("stop_on_newline"):  # greedy: cutting the text = stopping at "\n"
                        prediction = prediction.split("\n", 1)[0]
                    if sample.metric not in METRICS:
                        raise DapqError(f"Unknown metric {sample.metric!r}. Known: {', '.join(sorted(METRICS))}.")
                    score = 100.0 * score_prediction(sample.metric, prediction, sample.references, sample.metadata)
                    row = {
                        "sample_id": sample.id,
                        "task": sample.task,
                        "method": spec.name,
                        "method_key": spec.key,
                        "method_config": dataclasses.asdict(method),
                        "budget": budget,
                        "prediction": prediction,
                        "references": sample.references,
                        "metric": sample.metric,
                        "score": score,
                        "prompt_tokens": len(prompts[0]) + (0 if config.mode == "query_aware" else len(q)),
                        "kept_mean": cc.stats["kept_mean"],
                        "kv_bytes_compressed": cc.stats["kv_bytes_compressed"],
                        "kv_bytes_peak": cc.stats["kv_bytes_peak"],  # accounted as `generate` accounts it
                        "prefill_s": prefill_s.get(rec_key, 0.0),
                        "select_s": cc.stats["select_s"],
                        "decode_s": decode_s,
                        "decode_batch": len(ids),
                        "new_tokens": len(tokens),
                        "metadata": sample.metadata,
                        **meta,
                    }
                    _append_row(f, row)
                    done.add(row_key(sample.id, spec.key, budget))
                    progress.advance(task)
    return path
