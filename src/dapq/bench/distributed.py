"""`dapq eval ... --ray`: one sweep on a Ray cluster (or a local Ray instance), with the single-process run's rows.

Each worker is a Ray actor that loads the model once and evaluates whole samples with `runner.evaluate_sample`, the
function the single-process runner calls, so the rows are the same (predictions and scores; timings are each
machine's own). The driver is the only writer of the run's results.jsonl, under the run folder's lock, with the
single-process rules: one flushed and fsynced line per row, a torn last line cut on restart, every (sample, method,
budget) already written skipped. A sweep started on Ray therefore resumes with or without Ray.

Scheduling: one sample in flight per worker; a finished worker gets the next sample from the queue. A worker that
dies (killed, out of memory, its node lost) has its sample put back on the queue for the others; a sample that fails
twice (two deaths, or an exception on two workers) is written as error rows (`"error": ...`, score 0; reports leave
them out) instead of being retried forever. The end of the sweep reports retries, errors and each worker's throughput.

    run_ray(WorkerSpec(model=None), samples, [MethodSpec("full"), MethodSpec("dapq")], [128], "runs/x",
            config=RunConfig(model="smollm2-135m-instruct"), workers=2)
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import DapqError
from .base import Sample
from .runner import (
    RESULTS,
    MethodSpec,
    RunConfig,
    RunLock,
    append_row,
    done_keys,
    evaluate_sample,
    method_fields,
    open_run,
    row_key,
    row_meta,
    sweep_progress,
    todo_jobs,
)

MAX_ATTEMPTS = 2  # a sample that fails this many times is written as error rows


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker gets its model: `load_model` arguments, or `loader` (a picklable callable returning (model,
    tokenizer), e.g. for tests) instead."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    attn: str = "sdpa"
    cache_dir: str | None = None
    threads: int = 1  # torch threads per worker (CPU workers)
    loader: Callable[[], tuple[Any, Any]] | None = None

    def load(self) -> tuple[Any, Any]:
        if self.loader is not None:
            return self.loader()
        from ..models import load_model

        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else None  # the GPU Ray gave this actor
        return load_model(
            self.model, dtype=self.dtype, device=device, attn_implementation=self.attn, cache_dir=self.cache_dir
        )


class Worker:
    """The Ray actor's body (wrapped with `ray.remote` at run time, so importing this module needs no Ray)."""

    def __init__(self, spec: WorkerSpec):
        import torch

        torch.set_num_threads(max(1, spec.threads))
        self.model, self.tokenizer = spec.load()
        self.stops: set[int] | None = None

    def describe(self) -> dict[str, Any]:
        """What run.json records of the model (dtype, device type, attention), the host and the process id."""
        import socket

        param = next(self.model.parameters())
        return {
            "dtype": str(param.dtype).replace("torch.", ""),
            "device": param.device.type,
            "attn": getattr(self.model.config, "_attn_implementation", None),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def evaluate(self, sample: Sample, todo: list, config: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        rows = list(evaluate_sample(self.model, self.tokenizer, sample, todo, config, meta, self.stops))
        return {"rows": rows, "seconds": time.perf_counter() - start}


@dataclass
class WorkerStats:
    name: str
    host: str = ""
    samples: int = 0
    rows: int = 0
    busy_s: float = 0.0
    alive: bool = True


@dataclass
class RaySummary:
    """What `run_ray` did: rows written, samples retried, samples written as errors, per-worker throughput."""

    path: Path
    rows: int = 0
    retried: int = 0
    errors: int = 0
    dead_workers: int = 0
    startup_s: float = 0.0
    wall_s: float = 0.0
    workers: list[WorkerStats] = field(default_factory=list)


def ray_module() -> Any:
    """`ray`, or a one-line DapqError with the install command."""
    from ..extras import require

    return require("ray", "ray")


def error_rows(
    sample: Sample, todo: list, message: str, meta: dict[str, Any], config: RunConfig
) -> list[dict[str, Any]]:
    """One row per (method, budget) of a sample that failed MAX_ATTEMPTS times: resume skips it, reports omit it."""
    rows = []
    for spec, budget in todo:
        rows.append(
            {
                "sample_id": sample.id,
                "task": sample.task,
                "method": spec.name,
                "method_key": spec.key,
                "method_config": dataclasses.asdict(spec.build(budget)),
                "budget": budget,
                "prediction": "",
                "references": sample.references,
                "metric": sample.metric,
                "score": 0.0,
                "error": message,
                "metadata": sample.metadata,
                **meta,
            }
        )
    return rows


def run_ray(
    worker: WorkerSpec,
    samples: list[Sample],
    methods: list[MethodSpec],
    budgets: list[int | float],
    out_dir: str | Path,
    *,
    config: RunConfig,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float | None = None,
    console: Console | None = None,
    new_run: bool = False,
    init_kwargs: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> RaySummary:
    """Evaluate `samples` on `workers` Ray actors; the driver writes the rows. `address`: None starts a local Ray
    instance, "auto" joins the running cluster, else a cluster address. `gpus_per_worker`: None = 1 when the cluster
    has GPUs, else 0. `on_row(row, worker_info)` is called after each row is written (tests use it)."""
    ray = ray_module()
    if workers < 1:
        raise DapqError(f"--workers must be >= 1; got {workers}")
    console = console or Console(stderr=True)
    fields = method_fields(methods, budgets)  # validated before anything starts
    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
        if address is None:
            kwargs.setdefault("num_cpus", max(workers * max(1, worker.threads), os.cpu_count() or 1))
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise DapqError(
                f"--ray {address}: no Ray cluster there ({exc}). Start one with `ray start --head`, or omit the "
                "address for a local instance."
            ) from None
    try:
        return _drive(
            ray,
            worker,
            samples,
            methods,
            budgets,
            fields,
            out_dir,
            config,
            workers,
            gpus_per_worker,
            console,
            new_run,
            on_row,
            t0,
        )
    finally:
        if started_here:
            ray.shutdown()


def _drive(
    ray: Any,
    worker: WorkerSpec,
    samples: list[Sample],
    methods: list[MethodSpec],
    budgets: list[int | float],
    fields: dict,
    out_dir: str | Path,
    config: RunConfig,
    n_workers: int,
    gpus_per_worker: float | None,
    console: Console,
    new_run: bool,
    on_row: Callable | None,
    t0: float,
) -> RaySummary:
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    remote = ray.remote(num_cpus=max(1, worker.threads), num_gpus=gpus_per_worker, max_restarts=0)(Worker)
    actors = [remote.remote(worker) for _ in range(n_workers)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayActorError as exc:
        raise DapqError(f"A Ray worker could not load the model: {exc}") from None
    kinds = {(i["dtype"], i["device"], i["attn"]) for i in infos}
    if len(kinds) > 1:
        raise DapqError(
            f"Ray workers loaded the model differently ({sorted(kinds)}): rows of one run must share dtype, device "
            "type and attention. Pass --dtype / --device, or give every node the same hardware."
        )
    dtype, device, attn = kinds.pop()
    config = dataclasses.replace(config, dtype=dtype, device=device, attn=attn)
    out = open_run(out_dir, config, new_run=new_run)
    summary = RaySummary(path=out / RESULTS, startup_s=time.perf_counter() - t0)
    stats = {n: WorkerStats(name=f"worker {n}", host=infos[n]["host"]) for n in range(n_workers)}
    with RunLock(out):
        path = out / RESULTS
        done = done_keys(path)
        meta = row_meta(config)
        jobs_per_sample = sum(len(budgets) if s.uses_budget else 1 for s in methods)
        queue: deque[int] = deque()
        todo: dict[int, list] = {}
        for i, sample in enumerate(samples):
            todo[i] = todo_jobs(sample, methods, budgets, fields, done)
            if todo[i]:
                queue.append(i)
        attempts: dict[int, int] = {}
        last_error: dict[int, str] = {}
        in_flight: dict[Any, tuple[int, int]] = {}  # future -> (worker, sample index)
        idle = list(range(n_workers))
        with open(path, "a", encoding="utf-8") as f, sweep_progress(console) as progress:
            task = progress.add_task(f"eval on {n_workers} Ray worker(s)", total=len(samples) * jobs_per_sample)
            progress.advance(task, len(samples) * jobs_per_sample - sum(len(t) for t in todo.values()))

            def write(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
                for row in rows:
                    key = row_key(row["sample_id"], row["method_key"], row["budget"], row["method_config"])
                    if key in done:  # never twice, whatever a worker sends
                        continue
                    append_row(f, row)
                    done.add(key)
                    summary.rows += 1
                    progress.advance(task)
                    if on_row is not None:
                        on_row(row, info)

            while queue or in_flight:
                while queue and idle:
                    n, i = idle.pop(0), queue.popleft()
                    fut = actors[n].evaluate.remote(samples[i], todo[i], config, meta)
                    in_flight[fut] = (n, i)
                if not in_flight:
                    if queue:  # every worker is dead
                        raise DapqError(
                            f"Every Ray worker died; {len(queue)} sample(s) are not done. Rerun the same command to "
                            "resume (with or without --ray)."
                        )
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                fut = ready[0]
                n, i = in_flight.pop(fut)
                try:
                    result = ray.get(fut)
                except ray.exceptions.RayActorError as exc:  # the worker process died
                    stats[n].alive = False
                    summary.dead_workers += 1
                    last_error[i] = f"worker died: {type(exc).__name__}"
                    _failed(i, attempts, queue, summary, last_error, samples, todo, meta, config, write, infos[n])
                    continue
                except ray.exceptions.RayTaskError as exc:  # the sample raised inside a live worker
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    last_error[i] = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
                    _failed(i, attempts, queue, summary, last_error, samples, todo, meta, config, write, infos[n])
                    idle.append(n)
                    continue
                stats[n].samples += 1
                stats[n].rows += len(result["rows"])
                stats[n].busy_s += result["seconds"]
                write(result["rows"], infos[n])
                idle.append(n)
    summary.wall_s = time.perf_counter() - t0
    summary.workers = list(stats.values())
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 (already dead)
            pass
    print_summary(summary, console)
    return summary


def _failed(
    i: int,
    attempts: dict[int, int],
    queue: deque[int],
    summary: RaySummary,
    last_error: dict[int, str],
    samples: list[Sample],
    todo: dict[int, list],
    meta: dict[str, Any],
    config: RunConfig,
    write: Callable,
    info: dict[str, Any],
) -> None:
    """A sample's attempt failed: back on the queue (for another worker), or error rows after MAX_ATTEMPTS."""
    attempts[i] = attempts.get(i, 0) + 1
    if attempts[i] >= MAX_ATTEMPTS:
        summary.errors += 1
        write(error_rows(samples[i], todo[i], last_error[i], meta, config), info)
    else:
        summary.retried += 1
        queue.appendleft(i)


def print_summary(summary: RaySummary, console: Console) -> None:
    table = Table(
        title=f"Ray sweep: {summary.rows} rows in {summary.wall_s:.1f} s (start-up {summary.startup_s:.1f} s)"
    )
    for col in ("worker", "host", "samples", "rows", "busy s", "samples/min", "state"):
        table.add_column(col)
    for w in summary.workers:
        rate = 60.0 * w.samples / w.busy_s if w.busy_s else 0.0
        table.add_row(
            w.name, w.host, str(w.samples), str(w.rows), f"{w.busy_s:.1f}", f"{rate:.2f}", "ok" if w.alive else "died"
        )
    console.print(table)
    console.print(
        f"retried samples: {summary.retried}; samples written as errors: {summary.errors}; "
        f"workers lost: {summary.dead_workers}"
    )
