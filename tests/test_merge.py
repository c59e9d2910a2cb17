"""`dapq merge`: hostile and bad inputs are one-line errors that change nothing; good merges are deduplicated,
error-free, reproducible to the byte, and keep configurations apart only when asked (and then `dapq report` tells
them apart)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dapq.cli import main
from dapq.runs import config_hash

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "results" / "estimators" / "niah.jsonl.gz"  # written by the merge
SETTINGS = {"model": "m1", "model_id": "m1", "dtype": "float32", "mode": "query_aware", "seed": 0, "dapq": "0.2.0"}


def row(sample: str, method: str = "snapkv", budget: int | None = 64, score: float = 50.0, **extra) -> dict:
    return {
        "sample_id": sample,
        "task": "ruler/vt",
        "method": method.split(",")[0],
        "method_key": method,
        "budget": budget,
        "score": score,
        "metadata": {"length": 2048},
        "model": "m1",
        "mode": "query_aware",
        "seed": 0,
        "versions": {"dapq": "0.2.0"},
        "config_id": config_hash(SETTINGS),
        **extra,
    }


def jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text, mtime=0) if gz else text)
    return path


def run_folder(path: Path, rows: list[dict], settings: dict | None = None) -> Path:
    jsonl(path / "results.jsonl", rows)
    (path / "run.json").write_text(json.dumps({"settings": settings or SETTINGS}, indent=2, sort_keys=True))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: its name and a link's target, a file's bytes (hashed), or 'folder'."""
    seen = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                seen[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "folder"
            elif p.is_file():
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[rel] = "other"
    return seen


def merge(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["merge", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------- hostile and bad inputs
def _good(tmp: Path) -> Path:
    return jsonl(tmp / "in.jsonl", [row("s0"), row("s1")])


def _out_link_to_input(tmp: Path) -> list[str]:
    (tmp / "out.jsonl.gz").symlink_to(jsonl(tmp / "in.jsonl.gz", [row("s0")], gz=True))
    return [str(tmp / "in.jsonl.gz"), "--out", str(tmp / "out.jsonl.gz")]


def _out_link_outside(tmp: Path) -> list[str]:
    target = jsonl(tmp / "outside" / "keep.jsonl.gz", [row("other")], gz=True)
    (tmp / "out.jsonl.gz").symlink_to(target)
    return [str(_good(tmp)), "--out", str(tmp / "out.jsonl.gz")]


def _out_dangling_link(tmp: Path) -> list[str]:
    (tmp / "out.jsonl.gz").symlink_to(tmp / "outside" / "nowhere.jsonl.gz")
    return [str(_good(tmp)), "--out", str(tmp / "out.jsonl.gz")]


def _out_folder(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    return [str(_good(tmp)), "--out", str(tmp / "out")]


def _out_is_input(tmp: Path) -> list[str]:
    inp = jsonl(tmp / "in.jsonl.gz", [row("s0")], gz=True)
    return [str(inp), str(_good(tmp)), "--out", str(inp)]


def _out_is_input_spelled_otherwise(tmp: Path) -> list[str]:
    jsonl(tmp / "in.jsonl.gz", [row("s0")], gz=True)
    (tmp / "sub").mkdir()
    return ["in.jsonl.gz", "--out", str(tmp / "sub" / ".." / "in.jsonl.gz")]


def _out_hard_link_to_input(tmp: Path) -> list[str]:
    os.link(jsonl(tmp / "in.jsonl.gz", [row("s0")], gz=True), tmp / "out.jsonl.gz")
    return [str(tmp / "in.jsonl.gz"), "--out", str(tmp / "out.jsonl.gz")]


def _out_in_input_folder(tmp: Path) -> list[str]:
    folder = run_folder(tmp / "runs" / "a", [row("s0")])
    return [str(folder), "--out", str(folder / "results.jsonl")]


def _out_is_input_folder(tmp: Path) -> list[str]:
    folder = run_folder(tmp / "runs" / "a", [row("s0")])
    return [str(folder), "--out", str(folder)]


def _out_text_file(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("my notes\n")
    return [str(_good(tmp)), "--out", str(tmp / "notes.txt")]


def _list_line(tmp: Path) -> list[str]:
    (tmp / "bad.jsonl").write_text(json.dumps(row("s0")) + "\n[1, 2]\n")
    return [str(tmp / "bad.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _no_sample_id(tmp: Path) -> list[str]:
    bad = row("s0")
    del bad["sample_id"]
    jsonl(tmp / "bad.jsonl", [row("s1"), bad])
    return [str(_good(tmp)), str(tmp / "bad.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _nan_score(tmp: Path) -> list[str]:
    jsonl(tmp / "bad.jsonl", [row("s0", score=float("nan"))])
    return [str(tmp / "bad.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _bad_config_id(tmp: Path) -> list[str]:
    jsonl(tmp / "bad.jsonl", [row("s0", config_id=["x"])])
    return [str(tmp / "bad.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _torn_gz(tmp: Path) -> list[str]:
    data = gzip.compress("".join(json.dumps(row(f"s{i}")) + "\n" for i in range(200)).encode(), mtime=0)
    (tmp / "torn.jsonl.gz").write_bytes(data[: len(data) // 2])
    return [str(tmp / "torn.jsonl.gz"), "--out", str(tmp / "out.jsonl.gz")]


def _missing_input(tmp: Path) -> list[str]:
    return [str(_good(tmp)), str(tmp / "missing.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _folder_without_results(tmp: Path) -> list[str]:
    (tmp / "runs" / "empty").mkdir(parents=True)
    return [str(tmp / "runs" / "empty"), "--out", str(tmp / "out.jsonl.gz")]


def _bad_run_file(tmp: Path) -> list[str]:
    folder = run_folder(tmp / "runs" / "a", [row("s0")])
    (folder / "run.json").write_text("[1, 2]\n")
    return [str(folder), "--out", str(tmp / "out.jsonl.gz")]


def _fifo_input(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "pipe.jsonl")
    return [str(tmp / "pipe.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _only_error_rows(tmp: Path) -> list[str]:
    jsonl(tmp / "errors.jsonl", [row("s0", score=0.0, error="worker died: ActorDiedError")])
    return [str(tmp / "errors.jsonl"), "--out", str(tmp / "out.jsonl.gz")]


def _two_configurations(tmp: Path) -> list[str]:
    other = {**SETTINGS, "dtype": "bfloat16"}
    a = run_folder(tmp / "runs" / "a", [row("s0")])
    b = run_folder(tmp / "runs" / "b", [row("s0", config_id=config_hash(other))], other)
    return [str(a), str(b), "--out", str(tmp / "out.jsonl.gz")]


def _legacy_and_new_rows(tmp: Path) -> list[str]:
    legacy = row("s0")
    del legacy["config_id"]
    jsonl(tmp / "old.jsonl", [legacy])
    return [str(tmp / "old.jsonl"), str(_good(tmp)), "--out", str(tmp / "out.jsonl.gz")]


def _samples_outside_every_row(tmp: Path) -> list[str]:
    return [str(_good(tmp)), "--samples", "5-9", "--out", str(tmp / "out.jsonl.gz")]


def _samples_malformed(tmp: Path) -> list[str]:
    return [str(_good(tmp)), "--samples", "9-5", "--out", str(tmp / "out.jsonl.gz")]


HOSTILE: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "--out a link to an input": (_out_link_to_input, "is the input"),
    "--out a link to a file outside": (_out_link_outside, "symbolic link"),
    "--out a dangling link": (_out_dangling_link, "symbolic link"),
    "--out a folder": (_out_folder, "is a folder"),
    "--out an input": (_out_is_input, "is the input"),
    "--out an input, spelled otherwise": (_out_is_input_spelled_otherwise, "is the input"),
    "--out a hard link to an input": (_out_hard_link_to_input, "is the input"),
    "--out an input folder's results": (_out_in_input_folder, "is the input"),
    "--out an input folder": (_out_is_input_folder, "is the input"),
    "--out an unrelated text file": (_out_text_file, "will not overwrite"),
    "a JSON list line": (_list_line, "bad.jsonl:2: a results row must be a JSON object"),
    "a row without sample_id": (_no_sample_id, "bad.jsonl:2: row has no valid 'sample_id'"),
    "a NaN score": (_nan_score, "bad.jsonl:1"),
    "a config_id that is not a string": (_bad_config_id, "config_id must be a non-empty string"),
    "a torn .gz": (_torn_gz, "is not a complete gzip file"),
    "a missing input": (_missing_input, "missing.jsonl does not exist"),
    "a folder without results": (_folder_without_results, "holds no results.jsonl"),
    "a bad run.json": (_bad_run_file, "is not a dapq run file"),
    "a FIFO input": (_fifo_input, "is not a regular file or folder"),
    "only error rows": (_only_error_rows, "no result rows"),
    "two configurations": (_two_configurations, "dtype 'float32' / 'bfloat16'"),
    "rows with and without config_id": (_legacy_and_new_rows, "rows without config_id (model=m1"),
    "--samples that keep no row": (_samples_outside_every_row, "2 outside --samples"),
    "--samples HI below LO": (_samples_malformed, "--samples takes N"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_and_bad_inputs_are_one_line_errors_and_change_nothing(tmp_path, monkeypatch, capsys, case):
    setup, expected = HOSTILE[case]
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path)
    before = snapshot(tmp_path)
    rc, out, err = merge(capsys, *argv)
    assert rc == 2, (case, out, err)
    assert err.startswith("error: ") and err.endswith("\n") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and out == ""
    assert expected in err, err
    assert snapshot(tmp_path) == before, "a refused merge changed a file"


def test_two_configurations_error_names_the_option(tmp_path, capsys):
    rc, _, err = merge(capsys, *_two_configurations(tmp_path))
    assert rc == 2 and "--keep-apart" in err and "runs/a" in err and "runs/b" in err, err
    assert config_hash(SETTINGS) in err and config_hash({**SETTINGS, "dtype": "bfloat16"}) in err


# ------------------------------------------------------------------------------------------------------ good merges
def read_gz(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def test_dedupe_keeps_the_first_row_drops_error_rows_and_only_out_changes(tmp_path, capsys):
    a = jsonl(tmp_path / "a.jsonl", [row("s0", score=10.0), row("s1", error="worker died", score=0.0)])
    b = jsonl(tmp_path / "b.jsonl.gz", [row("s0", score=90.0), row("s2"), row("s0", budget=128)], gz=True)
    out = tmp_path / "merged.jsonl.gz"
    before = snapshot(tmp_path)
    rc, stdout, err = merge(capsys, str(a), str(b), "--out", str(out))
    assert rc == 0 and err == "", err
    summary = f"5 rows in, 1 duplicates, 1 error rows dropped, 3 rows out, 1 configuration -> {out}"
    assert stdout.strip() == summary, stdout
    rows = read_gz(out)
    assert [(r["sample_id"], r["budget"], r["score"]) for r in rows] == [
        ("s0", 64, 10.0),
        ("s2", 64, 50.0),
        ("s0", 128, 50.0),
    ]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "merged.jsonl.gz"} == before, "only --out may change"


def test_the_same_rows_give_the_same_bytes(tmp_path, capsys):
    a = jsonl(tmp_path / "a.jsonl", [row("s0"), row("s1")])
    first, second = tmp_path / "one.jsonl.gz", tmp_path / "two.jsonl.gz"
    assert merge(capsys, str(a), "--out", str(first))[0] == 0
    assert merge(capsys, str(a), "--out", str(second))[0] == 0
    data = first.read_bytes()
    assert data == second.read_bytes()
    assert data[3] == 0 and data[4:8] == b"\0\0\0\0", "no file name, no time stamp in the gzip header"
    assert merge(capsys, str(a), "--out", str(first))[0] == 0  # a merged file is replaced by a merge
    assert first.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "one.jsonl.gz", "two.jsonl.gz"]


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the committed results are not in this checkout")
def test_merging_a_committed_file_gives_its_bytes(tmp_path, capsys):
    out = tmp_path / "x.jsonl.gz"
    rc, _, err = merge(capsys, str(COMMITTED), str(COMMITTED), "--out", str(out))  # twice: all duplicates
    assert rc == 0, err
    assert out.read_bytes() == COMMITTED.read_bytes()


def test_folder_rows_without_config_id_take_the_folder_settings(tmp_path, capsys):
    legacy = row("s0", score=10.0)
    del legacy["config_id"]
    folder = run_folder(tmp_path / "runs" / "a", [legacy])
    newer = jsonl(tmp_path / "new.jsonl", [row("s0", score=90.0), row("s1")])
    rc, stdout, err = merge(capsys, str(folder), str(newer), "--out", str(tmp_path / "m.jsonl.gz"))
    assert rc == 0, err
    assert "3 rows in, 1 duplicates, 0 error rows dropped, 2 rows out, 1 configuration" in stdout
    assert [r["score"] for r in read_gz(tmp_path / "m.jsonl.gz")] == [10.0, 50.0]


def _report(capsys, path: Path) -> str:
    capsys.readouterr()
    assert main(["report", str(path)]) == 0
    return capsys.readouterr().out


def test_keep_apart_keeps_both_configurations_and_report_tells_them_apart(tmp_path, capsys):
    other = {**SETTINGS, "model": "m2", "model_id": "m2"}
    a = run_folder(tmp_path / "runs" / "a", [row("s0", score=10.0), row("s0", method="full", budget=None)])
    b_rows = [
        row("s0", score=90.0, model="m2", config_id=config_hash(other)),  # kept: another configuration's s0
        row("s1", model="m2", config_id=config_hash(other)),
        row("s1", score=0.0, model="m2", config_id=config_hash(other)),  # a duplicate within one configuration
    ]
    b = jsonl(tmp_path / "b.jsonl.gz", b_rows, gz=True)
    out = tmp_path / "merged" / "both.jsonl.gz"
    rc, stdout, err = merge(capsys, str(a), str(b), "--keep-apart", "--out", str(out))
    assert rc == 0, err
    assert "5 rows in, 1 duplicates, 0 error rows dropped, 4 rows out, 2 configurations" in stdout
    assert [(r["model"], r["sample_id"], r["score"]) for r in read_gz(out)] == [
        ("m1", "s0", 10.0),
        ("m1", "s0", 50.0),
        ("m2", "s0", 90.0),
        ("m2", "s1", 50.0),
    ]
    text = _report(capsys, out)
    assert "Configuration 1" in text and "Configuration 2" in text and "Configuration 3" not in text, text


def test_keep_apart_configurations_of_one_model_stay_apart_in_report(tmp_path, capsys):
    other = {**SETTINGS, "dtype": "bfloat16"}
    a = run_folder(tmp_path / "runs" / "a", [row("s0", score=10.0)])
    b = run_folder(tmp_path / "runs" / "b", [row("s0", score=90.0, config_id=config_hash(other))], other)
    out = tmp_path / "merged" / "both.jsonl.gz"
    rc, stdout, err = merge(capsys, str(a), str(b), "--keep-apart", "--out", str(out))
    assert rc == 0 and "2 rows out, 2 configurations" in stdout, err
    text = _report(capsys, out)
    assert "Configuration 1" in text and "Configuration 2" in text, text


def test_merge_help_imports_no_model_code():
    code = (
        "import contextlib, io, sys\nfrom dapq.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['merge', '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'dapq.harness.runner', 'dapq.runs.merge') "
        "if m in sys.modules))\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------- --samples
def test_sample_index_reads_the_last_s_part_of_an_id():
    from dapq.runs.merge import sample_index

    assert sample_index("ruler-niah_single_1-L2048-s0") == 0
    assert sample_index("unseen-code-L4096-s17") == 17
    assert sample_index("niah-L2048-d50-s3-kvf") == 3  # a NIAH cell of seed 3
    assert sample_index("niah-L2048-d50") == 0  # seed 0 writes no -s part
    assert sample_index("ruler-vt-s9-L2048-s12") == 12  # the last one counts


@pytest.mark.parametrize(
    "text, expected",
    [("5", (0, 4)), ("1", (0, 0)), ("5-9", (5, 9)), (" 0 - 4 ", (0, 4)), ("7-7", (7, 7))],
)
def test_parse_samples(text, expected):
    from dapq.runs.merge import parse_samples

    assert parse_samples(text) == expected


@pytest.mark.parametrize("text", ["0", "9-5", "-1", "a", "1-", "2.5", "1,2"])
def test_parse_samples_refuses_bad_ranges(text):
    from dapq.errors import DapqError
    from dapq.runs.merge import parse_samples

    with pytest.raises(DapqError, match="--samples takes N"):
        parse_samples(text)


def test_samples_keeps_only_those_indices_of_every_task_and_method(tmp_path, capsys):
    rows = [
        row(f"ruler-{task}-L2048-s{i}", method=m, budget=b, task=f"ruler/{task}")
        for task in ("vt", "cwe")
        for i in range(12)
        for m, b in (("full", None), ("snapkv", 64), ("snapkv", 128))
    ]
    src = run_folder(tmp_path / "runs" / "all", rows)
    out = tmp_path / "s5-9.jsonl.gz"
    rc, printed, err = merge(capsys, str(src), "--samples", "5-9", "--out", str(out))
    assert rc == 0, err
    kept = read_gz(out)
    expected = [r for r in rows if 5 <= int(r["sample_id"].rsplit("-s", 1)[1]) <= 9]
    assert kept == expected  # the same rows, in reading order
    assert "72 rows in" in printed and "42 rows outside samples 5-9 dropped" in printed and "30 rows out" in printed
    first = tmp_path / "first5.jsonl.gz"
    assert merge(capsys, str(src), "--samples", "5", "--out", str(first))[0] == 0
    assert {r["sample_id"].rsplit("-s", 1)[1] for r in read_gz(first)} == {"0", "1", "2", "3", "4"}
    plain = tmp_path / "plain.jsonl.gz"
    rc, printed, _ = merge(capsys, str(src), "--out", str(plain))
    assert rc == 0 and "outside" not in printed and len(read_gz(plain)) == 72
