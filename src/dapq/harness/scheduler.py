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

Start-up fails fast, with one line, instead of waiting on Ray (`dapq.harness.ray_cluster`): an address where nothing
answers, workers the cluster cannot hold.

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
from ..runs import RESULTS, RunConfig, RunLock, append_row, done_keys, open_run, row_key
from ..safefile import open_append
from ..tasks.sample import Sample
from .ray_cluster import ray_module, ray_session
from .runner import (
    MethodSpec,
    add_sweep_task,
    evaluate_sample,
    for_model,
    method_fields,
    row_meta,
    rows_per_sample,
    sweep_progress,
    todo_jobs,
    with_method_files,
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
            "model_config": self.model.config,  # the driver resolves the methods' model defaults with it
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
    """Evaluate `samples` on `workers` Ray actors; the driver writes the rows. `address`: None (or "local") starts a
    local Ray instance, "auto" joins the running cluster, else a cluster address; when Ray is already initialized,
    that instance is used. `gpus_per_worker`: None = 1 when the cluster has GPUs, else 0. Before any actor starts,
    `ray_session` checks the address and the cluster's room for the workers (one-line DapqErrors, Ray shut down).
    `on_row(row, worker_info)` is called after each row is written (tests use it)."""
    ray = ray_module()
    if workers < 1:
        raise DapqError(f"--workers must be >= 1; got {workers}")
    sweep = Sweep(samples, methods, budgets, config, new_run)  # methods validated before anything starts
    t0 = time.perf_counter()
    session = ray_session(
        address, workers=workers, threads=worker.threads, gpus_per_worker=gpus_per_worker, init_kwargs=init_kwargs
    )
    with session as gpus:
        scheduler = Scheduler(ray, worker, workers, gpus, sweep, console or Console(stderr=True), on_row, t0)
        return scheduler.run(out_dir)


@dataclass
class Sweep:
    """What a Ray sweep evaluates: the samples, methods x budgets (their fields validated), the run's config."""

    samples: list[Sample]
    methods: list[MethodSpec]
    budgets: list[int | float]
    config: RunConfig
    new_run: bool = False
    fields: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields = method_fields(self.methods, self.budgets)


class Scheduler:
    """The driver of one Ray sweep: its actors, the queue of sample indices, what is in flight on which worker, the
    attempts and last error of each sample, per-worker statistics and the summary; the only writer of the rows."""

    def __init__(
        self,
        ray: Any,
        worker: WorkerSpec,
        n_workers: int,
        gpus_per_worker: float,
        sweep: Sweep,
        console: Console,
        on_row: Callable | None,
        t0: float,
    ):
        self.ray, self.worker, self.n_workers, self.gpus = ray, worker, n_workers, gpus_per_worker
        self.sweep, self.console, self.on_row, self.t0 = sweep, console, on_row, t0
        self.queue: deque[int] = deque()
        self.todo: dict[int, list] = {}
        self.attempts: dict[int, int] = {}
        self.last_error: dict[int, str] = {}
        self.in_flight: dict[Any, tuple[int, int]] = {}  # future -> (worker, sample index)
        self.done: set[tuple] = set()
        self.meta: dict[str, Any] = {}
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.stats: dict[int, WorkerStats] = {}
        self.summary: RaySummary | None = None
        self._write: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None

    def start_workers(self) -> RunConfig:
        """Start the actors (each loads the model) and return the config with the dtype, device type and attention
        they loaded it with; workers that differ are a one-line DapqError."""
        ray = self.ray
        remote = ray.remote(num_cpus=max(1, self.worker.threads), num_gpus=self.gpus, max_restarts=0)(Worker)
        self.actors = [remote.remote(self.worker) for _ in range(self.n_workers)]
        try:
            self.infos = ray.get([a.describe.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            raise DapqError(f"A Ray worker could not load the model: {exc}") from None
        kinds = {(i["dtype"], i["device"], i["attn"]) for i in self.infos}
        if len(kinds) > 1:
            raise DapqError(
                f"Ray workers loaded the model differently ({sorted(kinds)}): rows of one run must share dtype, "
                "device type and attention. Pass --dtype / --device, or give every node the same hardware."
            )
        dtype, device, attn = kinds.pop()
        self.stats = {n: WorkerStats(name=f"worker {n}", host=self.infos[n]["host"]) for n in range(self.n_workers)}
        sweep = self.sweep
        methods = for_model(sweep.methods, self.infos[0]["model_config"])  # e.g. `learned`: the model's own queries
        if methods != sweep.methods:
            sweep.methods, sweep.fields = methods, method_fields(methods, sweep.budgets)
            sweep.config = with_method_files(sweep.config, methods, sweep.budgets)
        return dataclasses.replace(sweep.config, dtype=dtype, device=device, attn=attn)

    def run(self, out_dir: str | Path) -> RaySummary:
        sweep = self.sweep
        config = self.start_workers()
        out = open_run(out_dir, config, new_run=sweep.new_run)
        summary = self.summary = RaySummary(path=out / RESULTS, startup_s=time.perf_counter() - self.t0)
        with RunLock(out):
            path = out / RESULTS
            self.done = done_keys(path)
            self.meta = row_meta(config)
            for i, sample in enumerate(sweep.samples):
                self.todo[i] = todo_jobs(sample, sweep.methods, sweep.budgets, sweep.fields, self.done)
                if self.todo[i]:
                    self.queue.append(i)
            total = len(sweep.samples) * rows_per_sample(sweep.methods, sweep.budgets)
            to_do = sum(len(t) for t in self.todo.values())
            with open_append(path) as f, sweep_progress(self.console) as progress:
                task = add_sweep_task(progress, f"eval on {self.n_workers} Ray worker(s)", to_do, total, path)

                def write(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
                    for row in rows:
                        key = row_key(row["sample_id"], row["method_key"], row["budget"], row["method_config"])
                        if key in self.done:  # never twice, whatever a worker sends
                            continue
                        append_row(f, row)
                        self.done.add(key)
                        summary.rows += 1
                        progress.advance(task)
                        if self.on_row is not None:
                            self.on_row(row, info)

                self._write = write
                self.drive(config)
        summary.wall_s = time.perf_counter() - self.t0
        summary.workers = list(self.stats.values())
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 (already dead)
                pass
        print_summary(summary, self.console)
        return summary

    def drive(self, config: RunConfig) -> None:
        """One sample in flight per worker until the queue is empty and nothing is in flight."""
        ray, summary = self.ray, self.summary
        assert summary is not None and self._write is not None
        idle = list(range(self.n_workers))
        while self.queue or self.in_flight:
            while self.queue and idle:
                n, i = idle.pop(0), self.queue.popleft()
                fut = self.actors[n].evaluate.remote(self.sweep.samples[i], self.todo[i], config, self.meta)
                self.in_flight[fut] = (n, i)
            if not self.in_flight:
                if self.queue:  # every worker is dead
                    raise DapqError(
                        f"Every Ray worker died; {len(self.queue)} sample(s) are not done. Rerun the same command to "
                        "resume (with or without --ray)."
                    )
                break
            ready, _ = ray.wait(list(self.in_flight), num_returns=1)
            fut = ready[0]
            n, i = self.in_flight.pop(fut)
            try:
                result = ray.get(fut)
            except ray.exceptions.RayActorError as exc:  # the worker process died
                self.stats[n].alive = False
                summary.dead_workers += 1
                self.failed(i, n, config, f"worker died: {type(exc).__name__}")
                continue
            except ray.exceptions.RayTaskError as exc:  # the sample raised inside a live worker
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                self.failed(i, n, config, f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
                idle.append(n)
                continue
            self.stats[n].samples += 1
            self.stats[n].rows += len(result["rows"])
            self.stats[n].busy_s += result["seconds"]
            self._write(result["rows"], self.infos[n])
            idle.append(n)

    def failed(self, i: int, worker: int, config: RunConfig, error: str) -> None:
        """Sample i's attempt on `worker` failed: back on the queue (for another worker), or error rows after
        MAX_ATTEMPTS."""
        assert self.summary is not None and self._write is not None
        self.last_error[i] = error
        self.attempts[i] = self.attempts.get(i, 0) + 1
        if self.attempts[i] >= MAX_ATTEMPTS:
            self.summary.errors += 1
            rows = error_rows(self.sweep.samples[i], self.todo[i], error, self.meta, config)
            self._write(rows, self.infos[worker])
        else:
            self.summary.retried += 1
            self.queue.appendleft(i)


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
