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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..checks import clean_label, finite
from ..engine import append, derive_many, greedy_decode, merge, record, suffix_key
from ..errors import DapqError
from ..methods.base import Method, get_method, method_class
from ..methods.protocols import pseudo_length
from ..prompts import stop_token_ids
from ..safefile import FileLock, ensure_dir, open_append, truncate, write_json
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
        return method_class(self.name).evicts


@dataclass
class RunConfig:
    """Everything besides the method and budget that changes a row. A run folder holds one configuration."""

    model: str
    mode: str = "query_aware"
    seed: int = 0
    # methods (caches of similar length, padded) decode together, up to this many rows (32: on CPU BLAS, 16+ rows take
    # a faster GEMM kernel than 2-15, see docs/results/efficiency.md)
    decode_batch: int = 32
    batch_lookahead: bool = True  # LAQ's lookahead tokens of every budget decode as one batch (`derive_many`)
    extra: dict[str, Any] = field(default_factory=dict)  # bench arguments: task options, prompt options, ...
    model_id: str = ""  # what identifies the weights (models.model_fingerprint): file hash or revision
    dtype: str | None = None  # None: not known yet (`run` fills dtype, device and attn from the loaded model)
    device: str | None = None  # device type: cpu, cuda, ...
    attn: str | None = None  # the attention implementation under the hook
    # {method key: {parameter: sha256}} of the files the methods read (`with_method_files`): kept in run.json beside
    # the settings and checked per method key, so adding a method later is fine and a changed file is refused
    method_files: dict[str, dict[str, str]] = field(default_factory=dict)

    def with_model(self, model: Any) -> RunConfig:
        """The config with dtype, device type and attention implementation read from the loaded model."""
        param = next(model.parameters())
        impl = getattr(model.config, "_attn_implementation", None)
        return dataclasses.replace(
            self, dtype=str(param.dtype).replace("torch.", ""), device=param.device.type, attn=impl
        )

    def settings(self) -> dict[str, Any]:
        """The run's configuration as recorded in run.json (JSON-able, sorted keys)."""
        from .. import __version__

        base = {
            "model": self.model,
            "model_id": self.model_id or self.model,
            "dtype": self.dtype,
            "device": self.device,
            "attn": self.attn,
            "mode": self.mode,
            "seed": self.seed,
            "decode_batch": self.decode_batch,
            "batch_lookahead": self.batch_lookahead,
            "dapq": __version__,
        }
        return json.loads(json.dumps({**base, **{f"bench.{k}": v for k, v in self.extra.items()}}, default=str))


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


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able run config (names the output folder)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


RUN_FILE = "run.json"
LOCK_FILE = ".lock"
ROW_FIELDS = {"sample_id": str, "task": str, "method_key": str, "score": (int, float)}


def row_key(sample_id: str, method_key: str, budget: Any, method_config: dict[str, Any] | None = None) -> tuple:
    """What identifies a row inside one run folder (whose configuration is fixed by run.json)."""
    cfg = json.dumps(method_config, sort_keys=True, default=str) if method_config is not None else ""
    return (sample_id, method_key, json.dumps(budget), cfg)


def done_keys(path: Path) -> set[tuple]:
    """The row keys already in a results file (its torn last line cut off): what a resumed run skips."""
    return {row_key(r["sample_id"], r["method_key"], r["budget"], r.get("method_config")) for r in load_rows(path)}


def check_fields(row: Any, where: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON object with every field of `fields` (name -> type, `object` for any value; a bool is not a number),
    else a one-line DapqError naming `where`."""
    if not isinstance(row, dict):
        raise DapqError(f"{where}: a results row must be a JSON object; got {type(row).__name__}.")
    for name, kind in fields.items():
        value = row.get(name)
        numeric = kind in (int, float, (int, float))
        if name not in row or not isinstance(value, kind) or (numeric and isinstance(value, bool)):
            raise DapqError(f"{where}: row has no valid {name!r}; fix or delete that line.")
    return row


def check_row(row: Any, where: str) -> dict[str, Any]:
    """A results row with the fields reports and resumes rely on, else a one-line DapqError naming `where`."""
    check_fields(row, where, ROW_FIELDS)
    finite("score", row["score"], what=f"{where}: the row's")
    if not isinstance(row.get("metadata", {}), dict):
        raise DapqError(f"{where}: metadata must be a JSON object; fix or delete that line.")
    budget = row.get("budget")
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, (int, float))):
        raise DapqError(f"{where}: budget must be a number or null; got {budget!r}. Fix or delete that line.")
    return row


def load_rows(
    path: Path, *, repair: bool = True, check: Callable[[Any, str], dict[str, Any]] = check_row
) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file (or a gzipped one, `.gz`, read-only); a torn last line (a run killed
    mid-write) is cut off the file when `repair` (else ignored). A line that `check` refuses (default: not a
    results row) is a DapqError naming the file and line; so is a torn or foreign .gz file."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise DapqError(f"{path} is not a file.")
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        data = _gunzip(path, data)
        repair = False  # a compressed file is never rewritten in place
    good_end = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
    rows = []
    for lineno, line in enumerate(data[:good_end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = getattr(exc, "msg", "not UTF-8")
            raise DapqError(f"{path}:{lineno}: not a JSON row ({msg}); fix or delete that line.") from None
        rows.append(check(row, f"{path}:{lineno}"))
    if good_end != len(data) and repair:
        truncate(path, good_end)
    return rows


def _gunzip(path: Path, data: bytes) -> bytes:
    import gzip
    import zlib

    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # torn, truncated, or not gzip at all
        raise DapqError(f"{path} is not a complete gzip file ({exc}): copy it again or delete it.") from None


def _differences(recorded: dict[str, Any], settings: dict[str, Any], partial: bool = False) -> list[str]:
    keys = sorted(set(recorded) | set(settings))
    if partial:  # a check before the model load: settings still None are not known yet
        keys = [k for k in keys if settings.get(k) is not None]
    return [
        f"{k}: folder {recorded.get(k)!r}, this run {settings.get(k)!r}"
        for k in keys
        if recorded.get(k) != settings.get(k)
    ]


def legacy_settings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings a folder written before run.json existed can be checked against (from its rows)."""
    first = rows[0]
    out = {k: first.get(k) for k in ("model", "mode", "seed")}
    out["dapq"] = (first.get("versions") or {}).get("dapq")
    return out


def open_run(out_dir: str | Path, config: RunConfig, *, new_run: bool = False, check_only: bool = False) -> Path:
    """The run folder for `config`: created with its run.json, or an existing one written with the same settings.

    A folder written with other settings is refused with a one-line error that says which setting differs; with
    `new_run=True` the run goes to a new folder beside it (`<name>-2`, `<name>-3`, ...) instead. `check_only`:
    return the folder the run will use, create nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DapqError(f"--out {out} is an existing file: pass a folder.")
    settings = config.settings()
    candidate, n = out, 1
    while True:
        problem = _folder_mismatch(candidate, settings, partial=check_only) or _files_mismatch(candidate, config)
        if problem is None:
            break
        if not new_run:
            raise DapqError(
                f"{candidate} holds a run with other settings ({problem}). Use another --out, or --new-run to write a "
                "new folder beside it."
            )
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    if check_only:
        return candidate
    ensure_dir(candidate)
    run_file = candidate / RUN_FILE
    recorded = _recorded_files(candidate)
    if not run_file.exists() or any(k not in recorded for k in config.method_files):
        record = {"settings": settings, "method_files": {**recorded, **config.method_files}}
        write_json(run_file, record, indent=2, sort_keys=True)
    return candidate


def _recorded_files(folder: Path) -> dict[str, dict[str, str]]:
    try:
        files = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("method_files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _files_mismatch(folder: Path, config: RunConfig) -> str | None:
    """The method keys whose files differ from the ones the folder's rows were made with (None: none)."""
    recorded = _recorded_files(folder)
    changed = [k for k, files in config.method_files.items() if k in recorded and recorded[k] != files]
    if not changed:
        return None
    return "; ".join(
        f"{k}: its file changed since the folder's rows were written (sha256 {recorded[k]} -> {config.method_files[k]})"
        for k in changed
    )


def _folder_mismatch(folder: Path, settings: dict[str, Any], partial: bool = False) -> str | None:
    run_file = folder / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            raise DapqError(f"{run_file} is not a dapq run file: delete it or use another --out.") from None
        diff = _differences(recorded, settings, partial)
        return "; ".join(diff) if diff else None
    rows = load_rows(folder / RESULTS) if (folder / RESULTS).is_file() else []
    if not rows:
        return None
    recorded = legacy_settings(rows)
    diff = _differences(recorded, {k: settings.get(k) for k in recorded})
    return "; ".join(diff) if diff else None


class RunLock(FileLock):
    """An exclusive lock on a run folder (`.lock`, flock): a second process writing the same run is refused."""

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / LOCK_FILE, str(folder))


def append_row(f: Any, row: dict[str, Any]) -> None:
    """One row, flushed and fsynced: a row on disk is a row done."""
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
    # every method x budget built (validated) before the long run starts; their fields are part of the resume key
    fields = method_fields(methods, budgets)
    config = with_method_files(config, methods, budgets).with_model(model)
    out = open_run(out_dir, config, new_run=new_run)
    with RunLock(out):
        return _run_locked(model, tokenizer, samples, methods, budgets, fields, out, config, console, total)


def sweep_progress(console: Console) -> Progress:
    """The one progress bar of a sweep: rows done of all, elapsed, ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
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


def evaluate_sample(
    model: Any,
    tokenizer: Any,
    sample: Sample,
    todo: list[tuple[MethodSpec, int | float | None]],
    config: RunConfig,
    meta: dict[str, Any],
    stops: set[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of one sample for the given (method, budget) pairs, as they are decoded: one recording per pseudo
    suffix (methods without one share a plain prefill), every budget derived from it, caches decoded in batches.
    The single-process runner and every Ray worker call this, so their rows are the same."""
    from .metrics import METRICS, score_prediction

    stops = stop_token_ids(tokenizer) if stops is None else stops
    ctx, q = sample.prompt_ids(tokenizer)
    prompts = [ctx + q] if config.mode == "query_aware" else [ctx]
    built = [(spec, budget, spec.build(budget)) for spec, budget in todo]
    # record with a pseudo suffix first: methods without one can reuse that prefill (no second recording)
    built.sort(key=lambda job: pseudo_length(job[2]) == 0)
    recordings: dict[tuple, Any] = {}
    prefill_s: dict[tuple, float] = {}
    jobs: list[Any] = []  # (spec, budget, method, compressed cache, recording key)
    by_recording: dict[tuple, list[int]] = {}
    for spec, budget, method in built:
        skey = suffix_key(method, prompts, model, tokenizer)
        if skey not in recordings and not (skey == () and recordings):
            start = time.perf_counter()
            recordings[skey] = record(model, tokenizer, prompts, suffix=method if skey else None)
            prefill_s[skey] = time.perf_counter() - start
        rec_key = skey if skey in recordings else next(iter(recordings))
        by_recording.setdefault(rec_key, []).append(len(jobs))
        jobs.append((spec, budget, method, None, rec_key))
    for rec_key, ids in by_recording.items():
        derived = derive_many(recordings[rec_key], [jobs[n][2] for n in ids], config.batch_lookahead)
        for n, cc in zip(ids, derived):
            jobs[n] = (*jobs[n][:3], cc, rec_key)
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
                # a context pass (KVzip) and a draft (SpecKV) run before the first token: TTFT includes them
                "pass_s": cc.stats.get("pass_s", 0.0),
                "draft_s": cc.stats.get("draft_s", 0.0),
                "draft_kv_bytes_peak": cc.stats.get("draft_kv_bytes_peak", 0),
                "decode_s": decode_s,
                "decode_batch": len(ids),
                "new_tokens": len(tokens),
                "metadata": sample.metadata,
                **meta,
            }
            yield row


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
    total: int | None,
) -> Path:
    path = out / RESULTS
    done = done_keys(path)
    samples = list(samples)
    stops = stop_token_ids(tokenizer)
    meta = row_meta(config)
    console = console or Console(stderr=True)
    jobs_per_sample = sum(len(budgets) if s.uses_budget else 1 for s in methods)
    with open_append(path) as f, sweep_progress(console) as progress:
        task = progress.add_task("eval", total=(total or len(samples)) * jobs_per_sample)
        for sample in samples:
            todo = todo_jobs(sample, methods, budgets, fields, done)
            progress.advance(task, jobs_per_sample - len(todo))
            if not todo:
                continue
            progress.update(task, description=escape(clean_label(f"{sample.task} {sample.id}")))  # ids from data files
            for row in evaluate_sample(model, tokenizer, sample, todo, config, meta, stops):
                append_row(f, row)
                done.add(row_key(sample.id, row["method_key"], row["budget"], row["method_config"]))
                progress.advance(task)
    return path
