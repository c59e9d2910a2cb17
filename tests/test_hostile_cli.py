"""Numeric and path options of `dapq bench` / `dapq eval` (issue 27): every value finite and in range, every --out
writable, each refused with a one-line error (exit 2) before any model load."""

from __future__ import annotations

import pytest

import dapq.models
from dapq.cli import main

CASES = [
    (["bench", "ttft", "--repeats", "0"], "--repeats must be an integer >= 1"),
    (["bench", "ttft", "--threads", "0"], "--threads must be an integer >= 1"),
    (["bench", "ttft", "--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["bench", "throughput", "--new-tokens", "0"], "--new-tokens must be an integer >= 1"),
    (["bench", "throughput", "--memory-cap", "infGiB"], "--memory-cap takes a size"),
    (["bench", "throughput", "--memory-cap", "nanMiB"], "--memory-cap takes a size"),
    (["bench", "throughput", "--memory-cap=-4GiB"], "--memory-cap takes a size"),
    (["bench", "ttft", "--budget", "nan"], "--budget takes a token count"),
    (["bench", "ttft", "--budget", "inf"], "--budget takes a token count"),
    (["bench", "ttft", "--out", "/proc/dapq-test"], "pass a writable folder"),
    (["eval", "niah", "--budgets", "nan"], "--budgets takes a token count"),
    (["eval", "niah", "--out", "/proc/dapq-test"], "pass a writable folder"),
    (["generate", "--budget", "1e400", "--context", "a b", "--question", "q?"], "--budget takes a token count"),
]


@pytest.mark.parametrize("argv", [c[0] for c in CASES], ids=[" ".join(c[0][:4]) for c in CASES])
def test_bad_numbers_and_paths_before_the_model_load(argv, capsys, monkeypatch):
    words = dict((" ".join(a), w) for a, w in CASES)[" ".join(argv)]

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(dapq.models, "load_model", no_load)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["bench", "ttft", "--out", str(tmp_path / "f" / "bench")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"
