"""`dapq report` and `dapq report --front` against hostile files (issue 27): non-finite scores and bench values are
one-line errors, labels lose their control characters before any terminal, markdown or figure, and nothing outside
the named folder is written (a sentinel tree hashed before and after)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dapq.cli import main
from test_front import _bench, _row, _ruler_rows, _write_run
from test_safefile import tree_hash

ESC = "\x1b[2J\x1b]0;owned\x07"
BIDI = "\u202e"


def _run(tmp: Path, rows: list[dict] | None = None) -> Path:
    return _write_run(tmp / "run", rows if rows is not None else _ruler_rows())


def _raw_run(tmp: Path, text: str) -> Path:
    folder = _run(tmp)
    (folder / "results.jsonl").write_text(text)
    return folder


def _bench_file(tmp: Path, kind: str, value) -> Path:
    path = tmp / f"{kind}.json"
    path.write_text(json.dumps(_bench(kind, 64, {"snapkv": {2000: value}}), allow_nan=True))
    return path


def case_nan_score(tmp, outside):
    row = json.dumps(_row("snapkv", 64, "ruler/vt", "s0", 1.0)).replace('"score": 1.0', '"score": NaN')
    return ["report", "--front", str(_raw_run(tmp, row + "\n"))]


def case_inf_score(tmp, outside):
    row = json.dumps(_row("snapkv", 64, "ruler/vt", "s0", 1.0)).replace('"score": 1.0', '"score": Infinity')
    return ["report", str(_raw_run(tmp, row + "\n"))]


def case_negative_peak(tmp, outside):
    return ["report", "--front", str(_run(tmp)), "--memory", str(_bench_file(tmp, "memory", -5.0))]


def case_nan_peak(tmp, outside):
    return ["report", "--front", str(_run(tmp)), "--memory", str(_bench_file(tmp, "memory", float("nan")))]


def case_inf_ttft(tmp, outside):
    return ["report", "--front", str(_run(tmp)), "--ttft", str(_bench_file(tmp, "ttft", float("inf")))]


def case_out_dangling(tmp, outside):
    (tmp / "front").symlink_to(outside / "later")
    return ["report", "--front", str(_run(tmp)), "--out", str(tmp / "front")]


def case_out_under_file(tmp, outside):
    (tmp / "file").write_text("x")
    return ["report", "--front", str(_run(tmp)), "--out", str(tmp / "file" / "front")]


def case_out_a_file(tmp, outside):
    (tmp / "file").write_text("x")
    return ["report", "--front", str(_run(tmp)), "--out", str(tmp / "file")]


def case_front_md_link(tmp, outside):
    folder = _run(tmp)
    (folder / "front.md").symlink_to(outside / "victim.md")
    return ["report", "--front", str(folder)]


def case_report_md_link(tmp, outside):
    folder = _run(tmp)
    (folder / "report.md").symlink_to(outside / "victim.md")
    return ["report", str(folder)]


def case_figure_link(tmp, outside):
    folder = _run(tmp)
    (folder / "accuracy_vs_budget.png").symlink_to(outside / "victim.md")
    return ["report", str(folder)]


HOSTILE = [
    ("a NaN score", case_nan_score, "score must be a finite number"),
    ("an infinite score", case_inf_score, "score must be a finite number"),
    ("a negative bench peak", case_negative_peak, "no finite, non-negative"),
    ("a NaN bench peak", case_nan_peak, "no finite, non-negative"),
    ("an infinite TTFT", case_inf_ttft, "no finite, non-negative"),
    ("--out a dangling link", case_out_dangling, "dangling symbolic link"),
    ("--out under a file", case_out_under_file, "is a file, not a folder"),
    ("--out a file", case_out_a_file, "is an existing file"),
    ("front.md a link outside", case_front_md_link, "symbolic link"),
    ("report.md a link outside", case_report_md_link, "symbolic link"),
    ("a figure a link outside", case_figure_link, "symbolic link"),
]


@pytest.fixture
def world(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.md").write_text("precious\n")
    return tmp_path, outside


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_report_hostile(world, capsys, case):
    tmp, outside = world
    _, make, words = case
    argv = make(tmp, outside)
    sentinel = tree_hash(outside)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert "Traceback" not in captured.err
    assert tree_hash(outside) == sentinel, "a file outside the named folder changed"


def test_predictable_temporaries_of_old_versions_are_never_written(world, capsys):
    """Links planted at the temporary names earlier versions used (.front.md.<pid>.tmp, .front.<pid>.tmp.png, for
    this and the coming process ids) receive nothing."""
    tmp, outside = world
    folder = _run(tmp)
    pid = os.getpid()
    for p in range(pid, pid + 3):
        for name in (f".front.md.{p}.tmp", f".front.{p}.tmp.png", f".report.md.{p}.tmp"):
            (folder / name).symlink_to(outside / "victim.md")
    sentinel = tree_hash(outside)
    assert main(["report", "--front", str(folder)]) == 0
    assert main(["report", str(folder)]) == 0
    assert tree_hash(outside) == sentinel
    assert (folder / "front.md").is_file() and not (folder / "front.md").is_symlink()


def test_control_characters_never_reach_the_terminal_markdown_or_figures(world, capsys):
    tmp, outside = world
    evil = f"snap{ESC}kv{BIDI}"
    rows = [dict(r, method=evil, method_key=evil) if r["method_key"] == "snapkv" else r for r in _ruler_rows()]
    rows = [dict(r, task=f"ruler/vt{BIDI}") if r["task"] == "ruler/vt" else r for r in rows]
    folder = _write_run(tmp / "run", rows, {"model": f"tiny{ESC}", "mode": "query_aware", "seed": 0})
    assert main(["report", "--front", str(folder)]) == 0
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr()
    written = "".join(p.read_text() for p in folder.glob("*.md"))
    for text in (out.out, out.err, written):
        assert "\x1b" not in text and "\x07" not in text and BIDI not in text
    assert "snap[2J]0;ownedkv" in written  # the printable rest of the label is kept
    # a task group named with rich markup, and "the rest" holding the task above: the titles show both as text
    argv = ["report", str(folder), "--paired", "dapq,full", "--group", "g[red]x[/red]=cwe"]
    assert main(argv) == 0
    out = capsys.readouterr()
    written = (folder / "report.md").read_text()
    for text in (out.out, out.err, written):
        assert "\x1b" not in text and "\x07" not in text and BIDI not in text
    assert "task group g[red]x[/red] (1 tasks: cwe)" in written and "task group the rest (1 tasks: vt" in written
    assert "g[red]x[/red]" in out.out.replace("\n", "")
    # a method key with ESC asked for by name is an error without the escape
    assert main(["report", str(folder), "--paired", f"nope{ESC},full"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1
