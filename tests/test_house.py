"""The house rules of the harness side: the tasks, run storage and reports import no torch and no engine (so
`dapq report` and `dapq merge` read rows in a fraction of a second), and no module grows past 500 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MODEL_CODE = ("torch", "transformers", "dapq.engine", "dapq.hf", "dapq.methods", "dapq.harness")
LIGHT = ("dapq.tasks", "dapq.runs", "dapq.report")


def _modules(package: str) -> list[str]:
    folder = SRC / package.replace(".", "/")
    return sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__") + [package]


def _fresh(code: str) -> str:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_tasks_runs_and_reports_import_no_model_code():
    modules = [m for package in LIGHT for m in _modules(package)]
    code = f"""
import importlib, sys
for m in {modules!r}:
    importlib.import_module(m)
from dapq.tasks import families, task_names
families(); task_names()  # every built-in family module imported
print(sorted(m for m in {MODEL_CODE!r} if m in sys.modules))
"""
    assert len(modules) > 20
    assert _fresh(code) == "[]", "dapq.tasks / dapq.runs / dapq.report imported model code"


def test_dapq_report_on_committed_rows_imports_no_model_code(tmp_path):
    rows = tmp_path / "ruler-2k.jsonl.gz"
    shutil.copy(ROOT / "docs" / "results" / "front" / "ruler-2k.jsonl.gz", rows)
    code = f"""
import contextlib, io, sys
from dapq.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["report", {str(rows)!r}]) == 0
assert "AVG" in out.getvalue() and "…" not in out.getvalue(), "tables whole when stdout is not a terminal"
print(sorted(m for m in {MODEL_CODE!r} if m in sys.modules))
"""
    assert _fresh(code.replace("dapq.methods", "torch")) == "[]", "dapq report imported model code"


@pytest.mark.parametrize("path", sorted((SRC / "dapq").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_over_500_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 500, f"{path.relative_to(ROOT)} has {lines} lines: split it by what its parts do"
