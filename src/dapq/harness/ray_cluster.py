"""Ray start-up for `dapq eval ... --ray`, failing fast with one line instead of waiting on Ray: a cluster address
where no gRPC server answers within CONNECT_TIMEOUT_S (`check_address`: a TCP connect and the HTTP/2 handshake,
before `ray.init`, which would retry for minutes), and workers the cluster cannot hold (`check_resources`: workers x
(CPUs, GPUs) against every live node's totals, before any actor starts; Ray would leave them pending forever). A Ray
instance started here is shut down on every way out (`ray_session`). Importing this module needs no Ray."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..checks import clean_label
from ..errors import DapqError

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
