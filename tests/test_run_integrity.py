"""Issue 12, results side: a run folder holds one configuration (refused otherwise, or a new folder with
new_run), two writers are refused, hostile results files give one-line errors and never make `dapq report` write
outside the folder, and several configurations are reported separately."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dapq.errors import DapqError
from dapq.harness.runner import MethodSpec, run
from dapq.report.tables import safe_name, write_report
from dapq.runs import RESULTS, RUN_FILE, RunConfig, RunLock, load_rows, open_run
from dapq.tasks.sample import Sample
from helpers import TinyTokenizer, build_tiny

TOK = TinyTokenizer()
TESTS = Path(__file__).parent
SPECS = [MethodSpec("full"), MethodSpec.of("snapkv", window=4)]


def _samples(n: int) -> list[Sample]:
    return [
        Sample(
            id=f"s{i}",
            task="toy",
            context=f"the code is {i} " * 6,
            question="what is the code?",
            references=[str(i)],
            metric="string_match_all",
            max_new_tokens=3,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


BASE = dict(model="tiny", mode="query_aware", seed=0, extra={"bench": "toy"})
CHANGES = [
    ("mode", {"mode": "question_agnostic"}),
    ("model", {"model": "other"}),
    ("model_id", {"model_id": "tiny@sha256:0123"}),
    ("seed", {"seed": 1}),
    ("decode_batch", {"decode_batch": 4}),
    ("bench.max_prompt_tokens", {"extra": {"bench": "toy", "max_prompt_tokens": 100}}),
    ("bench.bench", {"extra": {"bench": "other"}}),
]


@pytest.mark.parametrize(("field", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_another_configuration_into_the_same_folder_is_refused(tiny, tmp_path, field, change):
    run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**BASE))
    before = (tmp_path / RESULTS).read_bytes()
    with pytest.raises(DapqError, match=field.split(".")[-1]) as info:
        run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**{**BASE, **change}))
    assert "\n" not in str(info.value) and "--new-run" in str(info.value)
    assert (tmp_path / RESULTS).read_bytes() == before, "the refused run must not add or change rows"
    path = run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**{**BASE, **change}), new_run=True)
    assert path.parent == tmp_path.with_name(tmp_path.name + "-2"), path
    assert len(load_rows(path)) == 2
    settings = json.loads((path.parent / RUN_FILE).read_text())["settings"]
    assert settings.get(field) != json.loads((tmp_path / RUN_FILE).read_text())["settings"].get(field)


def test_the_same_configuration_resumes(tiny, tmp_path):
    run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**BASE))
    run(tiny, TOK, _samples(2), SPECS, [12], tmp_path, config=RunConfig(**BASE))  # more samples: same run
    rows = load_rows(tmp_path / RESULTS)
    assert len(rows) == 4 and len({(r["sample_id"], r["method_key"]) for r in rows}) == 4
    assert len({r["config_id"] for r in rows}) == 1


def test_changed_method_fields_under_one_label_are_new_rows(tiny, tmp_path):
    run(
        tiny,
        TOK,
        _samples(1),
        [MethodSpec.of("snapkv", label="ref", window=4)],
        [12],
        tmp_path,
        config=RunConfig(**BASE),
    )
    run(
        tiny,
        TOK,
        _samples(1),
        [MethodSpec.of("snapkv", label="ref", window=6)],
        [12],
        tmp_path,
        config=RunConfig(**BASE),
    )
    rows = load_rows(tmp_path / RESULTS)
    assert sorted(r["method_config"]["window"] for r in rows) == [4, 6]


def test_a_folder_from_before_run_json_is_checked_against_its_rows(tiny, tmp_path):
    run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**BASE))
    (tmp_path / RUN_FILE).unlink()
    with pytest.raises(DapqError, match="mode"):
        run(tiny, TOK, _samples(1), SPECS, [12], tmp_path, config=RunConfig(**{**BASE, "mode": "question_agnostic"}))


def test_out_naming_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DapqError, match="existing file"):
        open_run(f, RunConfig(**BASE))


def test_two_writers_of_one_run_are_refused(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from dapq.runs import RunLock
        with RunLock(__import__("pathlib").Path({str(tmp_path)!r})):
            print("locked", flush=True)
            time.sleep(30)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DapqError, match=f"being written by pid {proc.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with RunLock(tmp_path):  # free again once the other process is gone
        pass


# ---------------------------------------------------------------------------------------------------- hostile files
GOOD = {
    "sample_id": "a",
    "task": "niah",
    "method_key": "full",
    "budget": None,
    "score": 50.0,
    "metadata": {"length": 1000, "depth": 50},
}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "results.jsonl:2: not a JSON row"),
        ("{}", "results.jsonl:2: row has no valid 'sample_id'"),
        ("[1, 2]", "results.jsonl:2: a results row must be a JSON object"),
        (json.dumps({**GOOD, "budget": "../../x"}), "results.jsonl:2: budget must be a number or null"),
        (json.dumps({**GOOD, "score": "high"}), "results.jsonl:2: row has no valid 'score'"),
        (json.dumps({**GOOD, "metadata": "x"}), "results.jsonl:2: metadata must be a JSON object"),
    ],
    ids=["garbage", "empty-object", "list", "budget-traversal", "score-string", "metadata-string"],
)
def test_a_bad_results_line_names_the_file_and_line(tmp_path, line, message):
    (tmp_path / RESULTS).write_text(json.dumps(GOOD) + "\n" + line + "\n")
    for call in (lambda: write_report(tmp_path), lambda: load_rows(tmp_path / RESULTS)):
        with pytest.raises(DapqError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.filterwarnings("error::UserWarning")  # an empty figure draws no legend (matplotlib warned)
def test_report_on_a_hostile_folder_writes_nothing_outside_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.md").write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.md").symlink_to(outside / "target.md")
    bad = "../../outside/x/../[red]|evil\n"
    rows = [
        {
            **GOOD,
            "sample_id": bad,
            "task": "niah",
            "method_key": bad,
            "budget": 64,
            "method": bad,
            "metadata": {"length": 1000, "depth": 10, "extra": bad},
            "prediction": bad,
        },
        {**GOOD, "sample_id": "b", "task": bad, "method_key": "../../../etc/passwd", "budget": 128},
        {**GOOD, "sample_id": "c", "method_key": "full", "budget": None, "model": bad, "mode": bad},
    ]
    (run_dir / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _tree(tmp_path)
    with pytest.raises(DapqError, match="report.md is a symbolic link"):  # never written through, never replaced
        write_report(run_dir)
    assert (outside / "target.md").read_text() == "precious", "the symlinked report.md target was overwritten"
    (run_dir / "report.md").unlink()
    write_report(run_dir)
    after = _tree(tmp_path)
    changed = {k for k in after if before.get(k) != after[k]}
    assert all(k.startswith("run/") for k in changed), f"written outside the run folder: {changed}"
    assert all(safe_name(p.name) == p.name for p in run_dir.iterdir() if p.suffix == ".png")


def test_safe_names():
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("..") == "x" and "/" not in safe_name("a/b") and safe_name("dapq[N=8]") == "dapq_N=8"


def test_report_separates_configurations(tmp_path):
    for name, mode in (("a", "query_aware"), ("b", "question_agnostic")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / RUN_FILE).write_text(json.dumps({"settings": {"model": "m", "mode": mode}}))
        rows = [
            {**GOOD, "task": "toy", "sample_id": f"s{i}", "score": 100.0 if mode == "query_aware" else 0.0}
            for i in range(2)
        ]
        (folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert "# Configuration 1" in report and "# Configuration 2" in report
    assert "mode=query_aware" in report and "mode=question_agnostic" in report
    assert "| full | 100.00 | 100.00 |" in report and "| full | 0.00 | 0.00 |" in report, report
    assert "50.00" not in report, "rows of two configurations were averaged together"
