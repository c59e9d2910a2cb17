"""`dapq eval --ray`: a sweep on Ray workers writes the single-process rows, survives a worker's death, resumes.

A local Ray instance with 2 CPU workers on a tiny model (skipped when Ray is not installed: pip install "dapq[ray]").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dapq.harness.runner import MethodSpec, run
from dapq.runs import RunConfig, load_rows
from dapq.tasks.sample import Sample
from helpers import DyingLoader, TinyTokenizer, build_tiny, tiny_loader, toy_samples

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "dapq[ray]"')

from dapq.harness.scheduler import WorkerSpec, run_ray  # noqa: E402

TESTS = Path(__file__).parent
INIT = {"num_cpus": 2, "runtime_env": {"env_vars": {"PYTHONPATH": str(TESTS)}}}
SPECS = [MethodSpec.of("full"), MethodSpec.of("snapkv", window=4), MethodSpec.of("dapq", n_pseudo_tokens=8)]
BUDGETS = [12, 24]
CONFIG = RunConfig(model="tiny-llama")


def samples(n: int, long_one: int | None = None) -> list[Sample]:
    return toy_samples(n, long_one=long_one)


def keyed(rows: list[dict]) -> dict[tuple, tuple]:
    return {(r["sample_id"], r["method_key"], json.dumps(r["budget"])): (r["prediction"], r["score"]) for r in rows}


def single_process(tmp_path: Path, items: list[Sample]) -> list[dict]:
    path = run(build_tiny("llama"), TinyTokenizer(), items, SPECS, BUDGETS, tmp_path / "single", config=CONFIG)
    return load_rows(path)


DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_ray as t
    from dapq.harness.scheduler import WorkerSpec, run_ray
    from helpers import SlowLoader
    run_ray(WorkerSpec(loader=SlowLoader(0.05)), t.samples(24), t.SPECS, t.BUDGETS, {out!r}, config=t.CONFIG,
            init_kwargs={{"num_cpus": 2, "runtime_env": {{"env_vars": {{"PYTHONPATH": {tests!r}}}}}}})
    """
)


def test_kill_minus_nine_of_the_driver_then_resume(tmp_path):
    """The driver process is killed (SIGKILL) in the middle of a Ray sweep; the same folder is finished by the
    single-process runner: no row lost, none duplicated, every row equal to a whole single-process run's.
    (First in this file: it starts its own Ray instance, before the module's shared one exists.)"""
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(tests=str(TESTS), out=str(out))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its Ray processes in their own group, cleaned up below
    )
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned local Ray instance it started
    except ProcessLookupError:
        pass
    partial = load_rows(results)
    assert 7 <= len(partial) < 24 * 5, f"killed with {len(partial)} rows"
    items = samples(24)
    path = run(build_tiny("llama"), TinyTokenizer(), items, SPECS, BUDGETS, out, config=CONFIG)
    rows = load_rows(path)
    keys = [(r["sample_id"], r["method_key"], json.dumps(r["budget"])) for r in rows]
    assert len(keys) == len(set(keys)) == 24 * 5, "rows lost or duplicated"
    assert keyed(rows) == keyed(single_process(tmp_path, items))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(include_dashboard=False, log_to_driver=False, **INIT)
    yield
    ray.shutdown()


def test_two_workers_write_the_single_process_rows(tmp_path, local_ray):
    items = samples(8)
    summary = run_ray(WorkerSpec(loader=tiny_loader), items, SPECS, BUDGETS, tmp_path / "ray", config=CONFIG)
    rows = load_rows(summary.path)
    want = keyed(single_process(tmp_path, items))
    assert len(rows) == len(want) == 8 * 5
    assert keyed(rows) == want  # predictions and scores; order may differ
    assert summary.retried == summary.errors == summary.dead_workers == 0
    assert sum(w.samples for w in summary.workers) == 8 and all(w.samples > 0 for w in summary.workers)
    settings = json.loads((summary.path.parent / "run.json").read_text())["settings"]
    assert (settings["dtype"], settings["device"], settings["attn"]) == ("float32", "cpu", "sdpa")


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path, local_ray):
    """One worker's process exits in the middle of a sample: that sample goes to the other worker; every row is
    written once and equals the single-process row."""
    items = samples(8)
    marker = tmp_path / "died"
    spec = WorkerSpec(loader=DyingLoader(str(marker), after=12))
    summary = run_ray(spec, items, SPECS, BUDGETS, tmp_path / "ray", config=CONFIG)
    assert marker.exists(), "no worker died: the test did not test anything"
    rows = load_rows(summary.path)
    keys = [(r["sample_id"], r["method_key"], json.dumps(r["budget"])) for r in rows]
    assert len(keys) == len(set(keys)) == 8 * 5, "rows lost or duplicated"
    assert keyed(rows) == keyed(single_process(tmp_path, items))
    assert summary.dead_workers == 1 and summary.retried == 1 and summary.errors == 0
    assert [w.alive for w in summary.workers].count(False) == 1


def test_a_sample_that_fails_twice_is_an_error_row(tmp_path, local_ray):
    items = samples(4, long_one=2)
    summary = run_ray(WorkerSpec(loader=tiny_loader), items, SPECS, BUDGETS, tmp_path / "ray", config=CONFIG)
    rows = load_rows(summary.path)
    errors = [r for r in rows if r.get("error")]
    assert summary.errors == 1 and summary.retried == 1
    assert {r["sample_id"] for r in errors} == {"s2"} and len(errors) == 5
    assert "512" in errors[0]["error"] or "position" in errors[0]["error"].lower(), errors[0]["error"]
    assert len(rows) == 4 * 5
    from dapq.report.tables import load_files

    assert {r["sample_id"] for r in load_files([summary.path])} == {"s0", "s1", "s3"}  # reports leave errors out
    # a rerun (with or without Ray) does not retry them, and adds nothing
    again = run(build_tiny("llama"), TinyTokenizer(), items, SPECS, BUDGETS, summary.path.parent, config=CONFIG)
    assert len(load_rows(again)) == 4 * 5


def test_a_stopped_ray_sweep_resumes_without_ray(tmp_path, local_ray):
    """The driver stopped after some rows (as if killed): the single-process runner finishes the same folder, and
    the rows equal a whole single-process run."""
    items = samples(6)
    out = tmp_path / "ray"

    class Stop(Exception):
        pass

    def stop_after(row, info, seen=[]):  # noqa: B006 (a counter for this one call)
        seen.append(row)
        if len(seen) == 7:
            raise Stop

    with pytest.raises(Stop):
        run_ray(WorkerSpec(loader=tiny_loader), items, SPECS, BUDGETS, out, config=CONFIG, on_row=stop_after)
    partial = load_rows(out / "results.jsonl")
    assert len(partial) == 7
    path = run(build_tiny("llama"), TinyTokenizer(), items, SPECS, BUDGETS, out, config=CONFIG)
    rows = load_rows(path)
    keys = [(r["sample_id"], r["method_key"], json.dumps(r["budget"])) for r in rows]
    assert len(keys) == len(set(keys)) == 6 * 5
    assert keyed(rows) == keyed(single_process(tmp_path, items))
