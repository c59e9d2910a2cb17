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

Start-up fails fast, with one line, instead of waiting on Ray: a cluster address where no gRPC server answers within
CONNECT_TIMEOUT_S (`check_address`: a TCP connect and the HTTP/2 handshake, before `ray.init`, which would retry
for minutes), and workers the cluster cannot hold (`check_resources`: workers x (CPUs, GPUs) against every live
node's totals, before any actor starts; Ray would leave them pending forever). A Ray instance started here is shut
down on every way out.

    run_ray(WorkerSpec(model=None), samples, [MethodSpec("full"), MethodSpec("dapq")], [128], "runs/x",
            config=RunConfig(model="smollm2-135m-instruct"), workers=2)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..checks import clean_label
from ..errors import DapqError
from ..safefile import open_append
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
#: seconds a cluster address gets to accept a TCP connection and to answer the HTTP/2 handshake (Ray's GCS and Ray
#: Client servers speak gRPC, so they answer it; a closed port, a dropped packet or another kind of server does not)
CONNECT_TIMEOUT_S = 3.0
#: Ray's GCS connection attempts when joining a cluster (RAY_gcs_server_port_wait_time_s, read by ray.init; Ray's own
#: default is 20 attempts of up to ~35 s each); set only while joining, and only when the user has not set it
JOIN_ATTEMPTS = "3"
#: Ray counts resources in units of 1/10000
RESOURCE_UNIT = 10_000
#: the HTTP/2 client preface and an empty SETTINGS frame; a gRPC server answers with its own SETTINGS frame
H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


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


# ---------------------------------------------------------------------------------------------------- start-up
def split_address(address: str) -> tuple[str, int]:
    """A cluster address `host:port` (also `[::1]:port` and `ray://host:port`) -> (host, port), or a one-line
    DapqError."""
    text = str(address).strip()
    rest = text[len("ray://") :] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DapqError(
            f"--ray {clean_label(address)!r}: pass a cluster address HOST:PORT (e.g. 10.0.0.1:6379, or "
            "ray://HOST:10001 for Ray Client), `auto` to join the running cluster, or no address for a local instance."
        )
    return host, int(port)


def check_address(address: str | None, timeout: float | None = None) -> None:
    """A one-line DapqError unless a gRPC server (a Ray GCS or a Ray Client server) answers at `address` within
    `timeout` seconds (default CONNECT_TIMEOUT_S). None and "local" (a local instance) are not checked; "auto" is
    checked when RAY_ADDRESS names the cluster (else Ray looks for a running one itself, and says at once when there
    is none). With RAY_USE_TLS the server expects TLS first: the TCP connection is all that is checked."""
    if address in (None, "local"):
        return
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if address in ("", "auto", "local"):
            return
    host, port = split_address(address)
    shown = clean_label(address)
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    hint = "Start a cluster with `ray start --head`, or pass --ray without an address for a local instance."
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true", "yes"):
                return
            sock.settimeout(timeout)
            sock.sendall(H2_HELLO)
            reply = b""
            while len(reply) < 9:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except socket.gaierror:
        raise DapqError(f"--ray {shown}: unknown host {clean_label(host)!r}. {hint}") from None
    except TimeoutError:
        raise DapqError(f"--ray {shown}: no answer within {timeout:g} s; is the address right? {hint}") from None
    except OSError as exc:
        reason = clean_label(exc.strerror or exc, 120)
        raise DapqError(f"--ray {shown}: no Ray cluster there ({reason}). {hint}") from None
    if len(reply) < 9 or reply[3] != 0x4:  # the server's first frame must be SETTINGS (type 4)
        raise DapqError(
            f"--ray {shown}: a server answers there, but it is not a Ray cluster. Pass the head node's GCS port (6379 "
            "unless `ray start --head --port` said otherwise; not the dashboard's 8265), or ray://HOST:10001 for Ray "
            "Client."
        )


def start_ray(ray: Any, address: str | None, cpus: int, init_kwargs: dict[str, Any] | None = None) -> bool:
    """`ray.init` for `address` (None or "local": a local instance with at least `cpus` CPUs), after `check_address`;
    False when Ray is already initialized (that instance is used, and left running). Ray's start-up messages stay
    below ERROR (`logging_level`); a failed start is shut down and becomes a one-line DapqError."""
    if ray.is_initialized():
        return False
    local = address in (None, "local")
    check_address(address)
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR, **(init_kwargs or {})}
    if local:
        kwargs.setdefault("num_cpus", max(cpus, os.cpu_count() or 1))
    env_name = "RAY_gcs_server_port_wait_time_s"
    set_env = not local and env_name not in os.environ
    if set_env:
        os.environ[env_name] = JOIN_ATTEMPTS
    said: list[str] = []  # what Ray's core wrote to stderr during a failed join
    try:
        with held_stderr(said, active=not local):
            ray.init(address="local" if local else address, **kwargs)  # "local": never RAY_ADDRESS's cluster
    except (OSError, RuntimeError, ValueError) as exc:  # ConnectionError, TimeoutError: OSErrors
        ray.shutdown()
        raise start_error(address, exc, said) from None
    finally:
        if set_env:
            os.environ.pop(env_name, None)
    return True


def start_error(address: str | None, exc: BaseException, said: list[str]) -> DapqError:
    """The one-line error of a failed `ray.init`: its message's first line, and the last line Ray's core logged."""
    text = str(exc).strip()
    first = clean_label(text.splitlines()[0] if text else type(exc).__name__, 300)
    if address in (None, "local"):
        return DapqError(f"A local Ray instance could not start: {first}")
    last = next((line for line in reversed(said) if line.strip()), "")
    last = clean_label(re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", last), 300)  # "[time W pid tid] file.cc:1: "
    hint = "Start one with `ray start --head`" if address == "auto" else "Check that it runs this Ray version"
    if "auth" in last.lower():
        hint = "The cluster wants its token: set RAY_AUTH_MODE=token here, with the head's ~/.ray/auth_token"
    return DapqError(
        f"--ray {clean_label(address)}: could not join a Ray cluster ({first}{f'; {last}' if last else ''}). {hint}, "
        "or pass --ray without an address for a local instance."
    )


@contextmanager
def held_stderr(said: list[str], active: bool = True) -> Iterator[None]:
    """File descriptor 2 (where Ray's core logs) held in a temporary file: written out on success, put in `said`
    (lines) on an exception. Only around a join: the processes a local instance starts would inherit the file."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
            if failed:
                said.extend(text.splitlines())
            else:
                sys.stderr.write(text)
                sys.stderr.flush()


def node_capacity(node: dict[str, float], cpus: int, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs one node (its resources, as in `ray.nodes()`) holds. A
    fraction of a GPU shares one GPU (0.4 -> 2 workers per GPU); more than one GPU takes whole GPUs (1.5 -> 2)."""
    counts = [int(node.get("CPU", 0) + 1e-9) // max(1, cpus)]
    if gpus > 0:
        node_gpus = int(node.get("GPU", 0) + 1e-9)
        if gpus < 1:
            counts.append(node_gpus * (RESOURCE_UNIT // max(1, round(gpus * RESOURCE_UNIT))))
        else:
            counts.append(node_gpus // math.ceil(gpus - 1e-9))
    return min(counts)


def check_resources(nodes: list[dict[str, float]], workers: int, cpus: int, gpus: float) -> None:
    """A one-line DapqError, saying what the cluster has and what to pass instead, when `workers` workers of `cpus`
    CPUs and `gpus` GPUs each do not all fit on `nodes` (the live nodes' total resources). Ray would keep the
    workers that do not fit pending forever."""
    fit = sum(node_capacity(n, cpus, gpus) for n in nodes)
    if fit >= workers:
        return
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    have = f"the cluster has {total_cpus:g} CPU(s) and {total_gpus:g} GPU(s) on {len(nodes)} node(s)"
    if len(nodes) > 1:
        most_cpus, most_gpus = (max(n.get(r, 0) for n in nodes) for r in ("CPU", "GPU"))
        have += f", at most {most_cpus:g} CPU(s) and {most_gpus:g} GPU(s) on one"

    def room(c: int, g: float) -> int:
        return sum(node_capacity(n, c, g) for n in nodes)

    hints = []
    if gpus > 0 and total_gpus <= 0:
        hints.append("--gpus-per-worker 0 (CPU workers), or join a cluster with GPUs")
    elif fit >= 1:
        hints.append(f"--workers {fit}")
    if 0 < total_gpus and gpus > 0:
        smaller = [g for g in (*range(math.ceil(gpus) - 1, 0, -1), 0.5, 0.25, 0.2, 0.125, 0.1) if g < gpus]
        hints += [f"--gpus-per-worker {g:g}" for g in smaller if room(cpus, g) >= workers][:1]
    if cpus > 1:
        hints += [f"--threads-per-worker {t}" for t in range(cpus - 1, 0, -1) if room(t, gpus) >= workers][:1]
    per_worker = f"{cpus} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus > 0 else "")
    raise DapqError(
        f"--ray: {workers} worker(s) of {per_worker} each cannot all start: {have}, room for {fit}. "
        f"Pass {' or '.join(hints) if hints else 'fewer --workers'}."
    )


def plan_resources(ray: Any, workers: int, threads: int, gpus_per_worker: float | None) -> float:
    """The GPUs per worker (None: 1 when the cluster has GPUs, else 0), after `check_resources` on the live nodes."""
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive", True)]
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if any(n.get("GPU", 0) > 0 for n in nodes) else 0.0
    check_resources(nodes, workers, max(1, threads), gpus)
    return gpus


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    workers: int = 2,
    threads: int = 1,
    gpus_per_worker: float | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> Iterator[float]:
    """Ray started (`start_ray`) and checked to hold `workers` workers (`plan_resources`); yields the GPUs per worker.
    A Ray instance started here is shut down on the way out, error or not."""
    ray = ray_module()
    started_here = start_ray(ray, address, workers * max(1, threads), init_kwargs)
    try:
        yield plan_resources(ray, workers, threads, gpus_per_worker)
    finally:
        if started_here:
            ray.shutdown()


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
    console = console or Console(stderr=True)
    fields = method_fields(methods, budgets)  # validated before anything starts
    t0 = time.perf_counter()
    session = ray_session(
        address, workers=workers, threads=worker.threads, gpus_per_worker=gpus_per_worker, init_kwargs=init_kwargs
    )
    with session as gpus:
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
            gpus,
            console,
            new_run,
            on_row,
            t0,
        )


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
    gpus_per_worker: float,
    console: Console,
    new_run: bool,
    on_row: Callable | None,
    t0: float,
) -> RaySummary:
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
        with open_append(path) as f, sweep_progress(console) as progress:
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
