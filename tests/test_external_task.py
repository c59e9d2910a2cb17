"""A benchmark family defined outside the package (docs/examples/colors_bench.py, the worked example of
docs/adding-a-benchmark.md) registers itself and runs through `dapq eval`, `dapq report` and the task registry."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dapq import tasks
from dapq.cli import main
from dapq.errors import DapqError
from dapq.runs import RESULTS, load_rows

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "colors_bench.py"


@pytest.fixture
def colors():
    spec = importlib.util.spec_from_file_location("colors_bench", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["colors_bench"] = module
    spec.loader.exec_module(module)  # registers the family
    yield module
    tasks.unregister_family("colors")
    sys.modules.pop("colors_bench", None)


def test_the_family_joins_the_registry_and_leaves_it(colors):
    assert "colors/fact" in tasks.task_names() and tasks.get_task("colors/fact").family == "colors"
    assert [f.name for f in tasks.families(evaluable=True)][-1] == "colors"
    assert tasks.select_tasks("colors") == ["colors/fact"]
    samples = tasks.task_samples(None, "colors/fact", tasks.TaskArgs(lengths=(300,), n=2, seed=4))
    assert [s.id for s in samples] == ["colors-L300-s4", "colors-L300-s5"]
    assert all(s.references[0] in s.context for s in samples)
    with pytest.raises(DapqError, match="exists already"):
        tasks.register_family(tasks.Family("ruler", lambda: []))
    tasks.unregister_family("colors")
    with pytest.raises(DapqError, match="Unknown task 'colors/fact'"):
        tasks.get_task("colors/fact")


def test_dapq_eval_runs_a_family_defined_outside_the_package(colors, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "colors", "--lengths", "200", "--samples", "2", "--methods", "full,snapkv", "--budgets", "48"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = load_rows(out / RESULTS)
    assert sorted((r["sample_id"], r["method_key"]) for r in rows) == [
        ("colors-L200-s0", "full"),
        ("colors-L200-s0", "snapkv"),
        ("colors-L200-s1", "full"),
        ("colors-L200-s1", "snapkv"),
    ]
    assert {r["task"] for r in rows} == {"colors/fact"} and all(0 <= r["score"] <= 100 for r in rows)
    assert json.loads((out / "run.json").read_text())["settings"]["bench.bench"] == "colors"
    assert main([*argv, "--out", str(out)]) == 0  # a rerun resumes: nothing new
    assert len(load_rows(out / RESULTS)) == 4
    assert main(["report", str(out)]) == 0
    assert "colors/fact" in (out / "report.md").read_text() or "fact" in (out / "report.md").read_text()


def test_an_entry_point_family_is_found(monkeypatch, colors):
    """An installed package's entry point in the `dapq.tasks` group that loads to a Family is a family."""
    from dapq.tasks import registry

    family = colors.FAMILY
    tasks.unregister_family("colors")

    class EntryPoint:
        name, value = "colors", "colors_bench:FAMILY"

        def load(self):
            return family

    class Broken(EntryPoint):
        def load(self):
            raise ImportError("no module named colors_bench")

    import importlib.metadata as md

    monkeypatch.setattr(md, "entry_points", lambda group: [EntryPoint()] if group == registry.ENTRY_POINTS else [])
    registry.forget_entry_points()
    try:
        assert tasks.get_family("colors") is family and "colors/fact" in tasks.task_names()
        monkeypatch.setattr(md, "entry_points", lambda group: [Broken()])
        registry.forget_entry_points()
        with pytest.raises(DapqError, match="does not load"):
            tasks.families()
    finally:
        monkeypatch.undo()
        registry.forget_entry_points()
