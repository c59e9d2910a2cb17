"""Reports are computed from result rows only: tables in the paper's layout, NIAH heatmaps, budget curves."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from dapq.cli.args import parse_lengths
from dapq.errors import DapqError
from dapq.report.tables import markdown_tables, summarize, write_report


def _rows() -> list[dict]:
    rows = []
    for method, budgets in [("full", [None]), ("snapkv", [64, 128]), ("dapq", [64, 128])]:
        for budget in budgets:
            for i, (length, depth) in enumerate([(1000, 0), (1000, 50), (2000, 0), (2000, 50)]):
                score = 100.0 if method == "full" else (50.0 * (i % 2) + (budget or 0) / 128 * 50)
                rows.append(
                    {
                        "sample_id": f"niah-L{length}-d{depth}",
                        "task": "niah",
                        "method": method,
                        "method_key": method,
                        "budget": budget,
                        "score": score,
                        "metadata": {"length": length, "depth": depth},
                    }
                )
            rows.append(
                {
                    "sample_id": "r0",
                    "task": "ruler/vt",
                    "method": method,
                    "method_key": method,
                    "budget": budget,
                    "score": 10.0,
                    "metadata": {"length": 2048},
                }
            )
    return rows


def test_summary_means_by_hand():
    tasks, methods, budgets, means = summarize(_rows())
    assert tasks == ["niah", "vt"] and methods == ["full", "snapkv", "dapq"] and budgets == [64, 128]
    # snapkv at 64: scores 25, 75, 25, 75 -> 50; at 128: 50, 100, 50, 100 -> 75
    assert means[("snapkv", 64, "niah")] == 50.0
    assert means[("snapkv", 128, "niah")] == 75.0
    assert means[("full", None, "niah")] == 100.0


def test_markdown_layout_blocks_per_budget_with_fullkv_and_avg():
    md = markdown_tables(_rows())
    assert "### Budget 64" in md and "### Budget 128" in md
    block64 = md.split("### Budget 64")[1].split("### Budget 128")[0]
    assert "| method | niah | vt | AVG |" in block64
    assert "| full | 100.00 | 10.00 | 55.00 |" in block64, block64  # FullKV repeated in every block
    assert "| snapkv | 50.00 | 10.00 | 30.00 |" in block64, block64


def test_write_report_renders_pngs(tmp_path):
    with open(tmp_path / "results.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
    report = write_report(tmp_path, Console(file=open(tmp_path / "out.txt", "w")))
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "accuracy_vs_budget.png" in pngs
    assert "niah_snapkv_64.png" in pngs and "niah_full_None.png" in pngs
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{p.name} is not a PNG"
    assert "![accuracy_vs_budget](accuracy_vs_budget.png)" in report.read_text()


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DapqError, match="No results.jsonl"):
        write_report(tmp_path)


def test_parse_lengths():
    assert parse_lengths("1000-2000:500") == [1000, 1500, 2000]
    assert parse_lengths("2048,4096") == [2048, 4096]
    assert parse_lengths("1k,2k") == [1000, 2000]
    with pytest.raises(DapqError, match="--lengths"):
        parse_lengths("abc")


def test_ruler_run_with_two_lengths_gets_a_section_per_length(tmp_path):
    """RULER at 2k and 4k: one table section and one budget curve per length, means computed within each length."""
    rows = []
    for length, score in [(2048, 80.0), (4096, 20.0)]:
        for method, budget in [("full", None), ("dapq", 64)]:
            for task in ("ruler/vt", "ruler/cwe"):
                rows.append(
                    {
                        "sample_id": f"{task}-L{length}",
                        "task": task,
                        "method": method,
                        "method_key": method,
                        "budget": budget,
                        "score": score if method == "full" else score / 2,
                        "metadata": {"length": length},
                    }
                )
    with open(tmp_path / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = write_report(tmp_path, Console(file=open(tmp_path / "out.txt", "w"))).read_text()
    assert "## 2048-token prompts" in text and "## 4096-token prompts" in text, text
    part2k, part4k = text.split("## 4096-token prompts")
    assert "| dapq | 40.00 | 40.00 | 40.00 |" in part2k, part2k
    assert "| dapq | 10.00 | 10.00 | 10.00 |" in part4k, part4k
    assert (tmp_path / "accuracy_vs_budget_L2048.png").exists() and (tmp_path / "accuracy_vs_budget_L4096.png").exists()


def test_report_into_a_pipe_prints_whole_cells(tmp_path):
    """`dapq report RUN | cat` (stdout not a terminal: a CI log, a file) prints the tables whole, no cell cut."""
    import gzip
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).parents[1] / "docs/results/learned-generic"
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_bytes(gzip.decompress((src / "ruler-2k.jsonl.gz").read_bytes()))
    (run / "run.json").write_bytes((src / "ruler-2k.run.json").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-m", "dapq.cli", "report", str(run)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout and "learned@generic" in done.stdout and "niah_multikey_1" in done.stdout
