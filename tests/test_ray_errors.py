"""`dapq eval --ray` fails fast, on one line: bad Ray options at parse time, an address where no Ray cluster answers
within seconds (not minutes of Ray's retries), workers the cluster cannot hold (not actors pending forever).

Every CLI case: exit code 2, exactly one line on stderr, no traceback, a wall-clock bound, Ray not left running, and
no file changed outside --out (a sentinel folder, the working directory, hashed before and after). Only one case
starts Ray (a local instance in a subprocess, so that what Ray writes at exit is seen too); the resource check is
also tested as a function on fake clusters.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "dapq[ray]"')

from dapq.cli import main  # noqa: E402
from dapq.errors import DapqError  # noqa: E402
from dapq.harness import ray_cluster as distributed  # noqa: E402
from dapq.harness.ray_cluster import (  # noqa: E402
    check_address,
    check_resources,
    held_stderr,
    node_capacity,
    plan_resources,
    start_error,
)

EVAL = ["eval", "niah", "--lengths", "200", "--depths", "1", "--methods", "full"]


# ---------------------------------------------------------------------------------------------------- helpers
def tree_hash(root: Path) -> str:
    """Names, sizes and contents of every file under `root`."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working directory: a folder with files, unchanged after the test (--out goes to tmp_path/out)."""
    cwd = tmp_path / "cwd"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "notes.txt").write_text("keep me\n")
    (cwd / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = tree_hash(cwd)
    monkeypatch.chdir(cwd)
    yield cwd
    assert tree_hash(cwd) == before, "a file outside --out changed"


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """These errors come before Ray starts and before any tokenizer or model loads."""
    from dapq import models

    def refuse(*args, **kwargs):
        raise AssertionError("started although the command line was refused")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)
    monkeypatch.setattr(models, "load_model", refuse)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: nothing listens there


class FakeServer:
    """A local TCP server: `silent` accepts and never answers; else it answers `reply` and closes."""

    def __init__(self, reply: bytes = b"", silent: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply, self.silent = reply, silent
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.silent:
                self.held.append(conn)
                continue
            try:
                conn.recv(64)
                conn.sendall(self.reply)
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def server() -> Iterator[type[FakeServer]]:
    made: list[FakeServer] = []

    def make(*args, **kwargs) -> FakeServer:
        made.append(FakeServer(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a gRPC server (Ray's GCS) sends first
HTTP1 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"  # e.g. the dashboard's port


# ---------------------------------------------------------------------------------------------------- the CLI
PARSE_CASES = [
    (["--ray", "--gpus-per-worker", "nan"], "--gpus-per-worker must be a finite number"),
    (["--ray", "--gpus-per-worker", "inf"], "--gpus-per-worker must be a finite number"),
    (["--ray", "--gpus-per-worker=-1"], "--gpus-per-worker must be >= 0"),
    (["--ray", "--gpus-per-worker", "abc"], "--gpus-per-worker must be a number"),
    (["--ray", "--gpus-per-worker", "1.5"], "a whole number of GPUs"),
    (["--ray", "--gpus-per-worker", "0.00001"], "at least 0.0001"),
    (["--ray", "--gpus-per-worker", "1e400"], "finite"),
    (["--ray", "--workers", "0"], "--workers must be >= 1"),
    (["--ray", "--workers", "-3"], "--workers must be >= 1"),
    (["--ray", "--workers", "2.5"], "--workers must be a whole number"),
    (["--ray", "--workers", "nan"], "--workers must be a finite number"),
    (["--ray", "--workers", "9" * 400], "--workers must be a finite number"),
    (["--ray", "--workers", "100000"], "--workers must be <= 4096"),
    (["--ray", "--workers", "two"], "--workers must be a number"),
    (["--ray", "--threads-per-worker", "0"], "--threads-per-worker must be >= 1"),
    (["--ray", "--threads-per-worker=-inf"], "--threads-per-worker must be a finite number"),
    (["--ray", "--threads-per-worker", "1.5"], "--threads-per-worker must be a whole number"),
    (["--ray", "127.0.0.1"], "pass a cluster address HOST:PORT"),
    (["--ray", "127.0.0.1:0"], "pass a cluster address HOST:PORT"),
    (["--ray", "127.0.0.1:70000"], "pass a cluster address HOST:PORT"),
    (["--ray", "ray://:10001"], "pass a cluster address HOST:PORT"),
    (["--workers", "2"], "go with --ray"),
    (["--gpus-per-worker", "nan"], "--gpus-per-worker must be a finite number"),  # checked with or without --ray
]


@pytest.mark.parametrize("argv, message", PARSE_CASES, ids=[" ".join(a) for a, _ in PARSE_CASES])
def test_bad_ray_options_are_one_line_errors_before_anything_starts(
    argv, message, tmp_path, sentinel, nothing_starts, capsys
):
    t0 = time.perf_counter()
    rc = main([*EVAL, "--out", str(tmp_path / "out"), *argv])
    elapsed = time.perf_counter() - t0
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and message in line, line
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()  # refused before the run folder is looked at


def address_cases(server) -> list[tuple[str, str]]:
    return [
        ("127.0.0.1:1", "no Ray cluster there"),  # the reported case: nothing answers
        (f"127.0.0.1:{closed_port()}", "no Ray cluster there"),
        (f"ray://127.0.0.1:{closed_port()}", "no Ray cluster there"),
        (f"127.0.0.1:{server(HTTP1).port}", "not a Ray cluster"),  # an HTTP/1 server, e.g. the dashboard
        (f"127.0.0.1:{server(b'').port}", "not a Ray cluster"),  # accepts, then hangs up
        (f"127.0.0.1:{server(silent=True).port}", "no answer within 0.5 s"),  # accepts, never answers
        ("no-such-host.invalid:6379", "unknown host"),
    ]


def test_an_address_without_a_ray_cluster_is_a_one_line_error_within_seconds(
    tmp_path, sentinel, server, capsys, monkeypatch
):
    """Ray itself retries such an address for minutes (20 attempts of ~40 s each in Ray 2.60)."""
    from dapq import models

    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    for address, message in address_cases(server):
        t0 = time.perf_counter()
        rc = main([*EVAL, "--out", str(tmp_path / "out"), "--ray", address])
        elapsed = time.perf_counter() - t0
        line = one_line_error(capsys.readouterr().err)
        assert rc == 2 and message in line, (address, line)
        assert elapsed < 20, f"{address}: {elapsed:.1f} s"
        assert not ray.is_initialized()
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_auto_with_ray_address_is_checked_too(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(DapqError, match="no Ray cluster there"):
        check_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    for address in (None, "local", "auto"):  # a local instance; Ray's own search (it fails at once)
        check_address(address)


def test_a_grpc_server_passes_the_address_check(server):
    check_address(f"127.0.0.1:{server(H2_SETTINGS).port}", timeout=2)
    check_address(f"ray://127.0.0.1:{server(H2_SETTINGS).port}", timeout=2)


def test_gpu_workers_on_a_cluster_without_gpus_are_refused_and_ray_is_shut_down(tmp_path):
    """The real thing: `dapq eval --ray --gpus-per-worker 1` on this GPU-less machine starts a local Ray instance,
    sees no GPU, says so on one line and shuts Ray down (no process of its group left, no crash dump)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep me\n")
    before = tree_hash(cwd)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "dapq", *EVAL, "--out", str(out), "--ray", "--gpus-per-worker", "1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.perf_counter() - t0
    line = one_line_error(err.decode())
    assert proc.returncode == 2, err.decode()
    assert "0 GPU(s)" in line and "--gpus-per-worker 0" in line, line
    assert elapsed < 30, f"{elapsed:.1f} s"  # Python, torch and Ray's start-up included (~10 s here)
    deadline = time.time() + 15
    while time.time() < deadline:  # Ray's processes (same process group) are gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Ray processes were left running")
    assert tree_hash(cwd) == before, "a file outside --out changed"
    assert not (out / "results.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- resources
NODE = {"CPU": 2.0, "memory": 1e9}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}
FOUR_GPUS = {"CPU": 4.0, "GPU": 2.0}

RESOURCE_CASES = [
    # nodes, workers, CPUs per worker, GPUs per worker, None (fits) or what the error says
    ([NODE], 2, 1, 0.0, None),
    ([NODE], 2, 1, 1.0, ["2 worker(s) of 1 CPU(s) and 1 GPU(s)", "0 GPU(s)", "room for 0", "--gpus-per-worker 0"]),
    ([NODE], 3, 1, 0.0, ["2 CPU(s)", "room for 2", "--workers 2"]),
    ([NODE], 1, 4, 0.0, ["room for 0", "--threads-per-worker 2"]),
    ([GPU_NODE], 1, 1, 1.0, None),
    ([GPU_NODE], 2, 1, 1.0, ["1 GPU(s)", "room for 1", "--workers 1", "--gpus-per-worker 0.5"]),
    ([GPU_NODE], 2, 1, 0.5, None),
    ([{"CPU": 8.0, "GPU": 2.0}], 4, 1, 0.4, None),  # 0.4 of a GPU: two per GPU
    ([{"CPU": 8.0, "GPU": 2.0}], 5, 1, 0.4, ["room for 4", "--workers 4", "--gpus-per-worker 0.25"]),
    ([FOUR_GPUS, FOUR_GPUS], 2, 1, 2.0, None),
    ([FOUR_GPUS, FOUR_GPUS], 1, 1, 3.0, ["at most 4 CPU(s) and 2 GPU(s) on one", "--gpus-per-worker 2"]),
    ([{"CPU": 4.0}, {"CPU": 4.0}], 2, 6, 0.0, ["8 CPU(s)", "2 node(s)", "--threads-per-worker 4"]),
    ([{"CPU": 4.0}, {"CPU": 4.0}], 2, 4, 0.0, None),
    ([], 1, 1, 0.0, ["0 node(s)", "room for 0"]),
]


@pytest.mark.parametrize("nodes, workers, cpus, gpus, expected", RESOURCE_CASES)
def test_check_resources(nodes, workers, cpus, gpus, expected):
    if expected is None:
        check_resources(nodes, workers, cpus, gpus)
        return
    with pytest.raises(DapqError) as info:
        check_resources(nodes, workers, cpus, gpus)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_node_capacity():
    assert node_capacity({"CPU": 8.0, "GPU": 2.0}, 1, 0.3) == 6  # 3 per GPU: fractions do not span GPUs
    assert node_capacity({"CPU": 8.0, "GPU": 2.0}, 1, 0.0001) == 8  # then the CPUs are the limit
    assert node_capacity({"CPU": 8.0, "GPU": 4.0}, 1, 1.5) == 2  # more than one GPU: whole GPUs
    assert node_capacity({"CPU": 3.0}, 2, 0.0) == 1
    assert node_capacity({}, 1, 0.0) == 0


class FakeRay:
    """What dapq calls of the `ray` module, recorded: init, shutdown, nodes."""

    def __init__(self, nodes: list[dict], fail: BaseException | None = None, initialized: bool = False):
        self._nodes, self.fail, self.initialized = nodes, fail, initialized
        self.calls: list[tuple] = []

    def nodes(self) -> list[dict]:
        return self._nodes

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, address: str | None = None, **kwargs) -> None:
        self.calls.append(("init", address, kwargs, os.environ.get("RAY_gcs_server_port_wait_time_s")))
        if self.fail is not None:
            raise self.fail
        self.initialized = True

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        self.initialized = False


def test_plan_resources_uses_live_nodes_and_defaults_to_one_gpu_when_there_are_gpus():
    live_cpu = {"Alive": True, "Resources": {"CPU": 4.0}}
    dead_gpu = {"Alive": False, "Resources": {"CPU": 4.0, "GPU": 8.0}}
    assert plan_resources(FakeRay([live_cpu, dead_gpu]), 2, 1, None) == 0.0
    with pytest.raises(DapqError, match="0 GPU"):
        plan_resources(FakeRay([live_cpu, dead_gpu]), 2, 1, 1.0)
    live_gpu = {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}}
    assert plan_resources(FakeRay([live_cpu, live_gpu]), 2, 1, None) == 1.0
    with pytest.raises(DapqError, match="--workers 2"):  # the default of 1 GPU each: 2 fit, not 3
        plan_resources(FakeRay([live_gpu]), 3, 1, None)


# ---------------------------------------------------------------------------------------------------- join errors
def test_a_failed_join_keeps_rays_core_log_off_stderr_and_names_its_cause(capfd):
    said: list[str] = []
    with pytest.raises(ConnectionError), held_stderr(said):
        os.write(
            2,
            b"[2026-01-01 00:00:00,000 W 1 1] gcs_client.cc:210: Failed to get cluster ID: Unauthenticated: "
            b"InvalidAuthToken\n",
        )
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    assert capfd.readouterr().err == ""
    error = start_error("10.0.0.1:6379", ConnectionError("Failed to connect to Ray cluster\nmore"), said)
    text = str(error)
    assert "\n" not in text and "gcs_client.cc" not in text
    assert "Unauthenticated" in text and "RAY_AUTH_MODE=token" in text
    with held_stderr([]):  # success: what Ray wrote is passed on
        os.write(2, b"joined\n")
    assert capfd.readouterr().err == "joined\n"


# ---------------------------------------------------------------------------------------------------- the session
CPU_ONLY = [{"Alive": True, "Resources": {"CPU": 2.0}}]


def test_ray_session_shuts_down_the_instance_it_started_on_every_error(monkeypatch, server):
    import logging

    from dapq.harness.ray_cluster import ray_session

    fake = FakeRay(CPU_ONLY)
    monkeypatch.setattr(distributed, "ray_module", lambda: fake)
    with pytest.raises(DapqError, match="0 GPU"), ray_session(None, workers=2, gpus_per_worker=1.0):
        pytest.fail("the session started although no GPU is there")
    (_, address, kwargs, _), last = fake.calls[0], fake.calls[-1]
    assert address == "local" and kwargs["num_cpus"] >= 2 and kwargs["logging_level"] == logging.ERROR
    assert last == ("shutdown",) and not fake.is_initialized()

    # a join that fails after the address answered: shut down, one line, Ray's retries cut to JOIN_ATTEMPTS
    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    fake = FakeRay(CPU_ONLY, fail=ConnectionError("Failed to connect to Ray cluster at x\nsecond line"))
    monkeypatch.setattr(distributed, "ray_module", lambda: fake)
    address = f"127.0.0.1:{server(H2_SETTINGS).port}"
    with pytest.raises(DapqError, match="could not join") as info, ray_session(address):
        pytest.fail("joined")
    assert "\n" not in str(info.value)
    assert fake.calls[0][1] == address and fake.calls[0][3] == distributed.JOIN_ATTEMPTS
    assert fake.calls[-1] == ("shutdown",) and "RAY_gcs_server_port_wait_time_s" not in os.environ

    # an error inside the session (the sweep) shuts Ray down too
    fake = FakeRay(CPU_ONLY)
    monkeypatch.setattr(distributed, "ray_module", lambda: fake)
    with pytest.raises(KeyError), ray_session(None, workers=1) as gpus:
        assert gpus == 0.0
        raise KeyError("boom")
    assert fake.calls[-1] == ("shutdown",)

    # Ray already initialized (by the caller): used, checked, and left running
    fake = FakeRay(CPU_ONLY, initialized=True)
    monkeypatch.setattr(distributed, "ray_module", lambda: fake)
    with pytest.raises(DapqError, match="--workers 2"), ray_session("127.0.0.1:1", workers=3):
        pass
    assert fake.calls == [] and fake.is_initialized()
