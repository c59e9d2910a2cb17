"""`dapq report --front`: accuracy vs peak KV and vs TTFT per method and budget, from result files only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from dapq.cli import main
from dapq.errors import DapqError
from dapq.report.front import group_points, load_runs, pareto, row_peak, row_ttft, write_front
from dapq.report.tables import markdown_tables

MiB = 2**20
SETTINGS = {"model": "tiny", "mode": "query_aware", "seed": 0, "dapq": "test"}


def _row(method: str, budget, task: str, sample: str, score: float, **extra) -> dict:
    row = {
        "sample_id": sample,
        "task": task,
        "method": method,
        "method_key": method,
        "budget": budget,
        "score": score,
        "prompt_tokens": 1900,
        "kv_bytes_peak": 10 * MiB,
        "prefill_s": 1.0,
        "select_s": 0.1,
        "pass_s": 0.0,
        "draft_s": 0.0,
        "draft_kv_bytes_peak": 0,
        "metadata": {"length": 2048},
    }
    row.update(extra)
    return row


def _write_run(folder: Path, rows: list[dict], settings: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"settings": settings or SETTINGS}))
    with open(folder / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def _ruler_rows() -> list[dict]:
    """full (no budget), snapkv and dapq at 64 and 128 on two tasks, two samples each."""
    rows = []
    specs = {
        # (method, budget): (score, peak MiB, prefill_s)
        ("full", None): (90.0, 80, 1.0),
        ("snapkv", 64): (40.0, 6, 1.0),
        ("snapkv", 128): (60.0, 9, 1.0),
        ("dapq", 64): (40.0, 6, 1.2),  # as accurate as snapkv 64, same peak, slower: dominated
        ("dapq", 128): (70.0, 9, 1.2),
    }
    for (method, budget), (score, peak, prefill) in specs.items():
        for task in ("ruler/vt", "ruler/cwe"):
            for s in range(2):
                rows.append(
                    _row(method, budget, task, f"{task}-s{s}", score, kv_bytes_peak=peak * MiB, prefill_s=prefill)
                )
    return rows


def _bench(kind: str, budget, cells: dict[str, dict[int, float]]) -> dict:
    field = "ttft_s" if kind == "ttft" else "peak_over_activations"
    rows: dict = {"transformers" if kind == "ttft" else "activations only": {"2000": {"prompt_tokens": 2000}}}
    for method, by_length in cells.items():
        rows[method] = {str(n): {"prompt_tokens": n, field: v} for n, v in by_length.items()}
    return {"kind": kind, "budget": budget, "lengths": sorted({n for c in cells.values() for n in c}), "rows": rows}


def _quiet(tmp_path: Path) -> Console:
    return Console(file=open(tmp_path / "console.txt", "w"), width=200)  # noqa: SIM115


# ---------------------------------------------------------------------------------------------------- the front
def test_pareto_by_hand_with_ties_and_dominated_points():
    values = [
        (50.0, 10.0, 1.0),  # A: on the front
        (50.0, 10.0, 1.0),  # B = A: equal points never dominate each other, both on the front
        (40.0, 10.0, 1.0),  # C: A is as good on peak and TTFT, better on accuracy -> dominated
        (40.0, 5.0, 2.0),  # D: the lowest peak -> on the front
        (30.0, 5.0, 2.0),  # E: D beats it on accuracy alone -> dominated
        (60.0, 100.0, 10.0),  # F: the best accuracy -> on the front
        (50.0, 10.0, 1.5),  # G: ties A on accuracy and peak, slower -> dominated
        (50.0, 10.0, 0.5),  # H: ties A on accuracy and peak, faster -> on the front (and A, B now dominated)
    ]
    assert pareto(values) == [False, False, False, True, False, True, False, True]
    assert pareto(values[:7]) == [True, True, False, True, False, True, False]
    # two axes (the figure's panels): accuracy up, x down
    assert pareto([(1.0, 1.0), (2.0, 2.0), (1.0, 3.0)], (1, -1)) == [True, True, False]


def test_accuracy_is_the_tables_avg_not_the_row_mean(tmp_path):
    # vt: 100, 0, 0 (mean 33.33); cwe: 100 (mean 100) -> AVG 66.67; the mean of the four rows would be 50
    rows = [_row("snapkv", 64, "ruler/vt", f"vt-{i}", s) for i, s in enumerate([100.0, 0.0, 0.0])]
    rows.append(_row("snapkv", 64, "ruler/cwe", "cwe-0", 100.0))
    points, tasks, left_out = group_points(rows)
    assert tasks == ["cwe", "vt"] and left_out == []
    assert points[0].accuracy == pytest.approx(200 / 3)
    assert "| snapkv | 100.00 | 33.33 | 66.67 |" in markdown_tables(rows)
    assert points[0].samples == 4


def test_a_method_without_every_task_is_left_out_and_named():
    rows = [_row("snapkv", 64, "ruler/vt", "vt-0", 50.0), _row("snapkv", 64, "ruler/cwe", "cwe-0", 50.0)]
    rows.append(_row("dapq", 64, "ruler/vt", "vt-0", 90.0))  # no cwe row
    points, _, left_out = group_points(rows)
    assert [p.name for p in points] == ["snapkv 64"] and left_out == ["dapq 64"]


def test_harness_ttft_and_accounted_peak_of_a_row():
    # a draft (SpecKV) runs before the prefill's clock: added; its cache, when larger, is the peak
    assert row_ttft(_row("speckv", 64, "t", "s", 0, prefill_s=2.0, select_s=0.5, draft_s=3.0)) == pytest.approx(5.5)
    assert row_peak(_row("speckv", 64, "t", "s", 0, kv_bytes_peak=100, draft_kv_bytes_peak=300)) == 300
    assert row_peak(_row("snapkv", 64, "t", "s", 0, kv_bytes_peak=100, draft_kv_bytes_peak=30)) == 100
    # the budget whose derive ran the context pass: pass_s is inside select_s (not added again)
    assert row_ttft(_row("kvzip", 64, "t", "s", 0, prefill_s=1.0, select_s=4.2, pass_s=4.0)) == pytest.approx(5.2)
    # another budget reusing the memoised pass: select_s is the selection alone, the pass is added
    assert row_ttft(_row("kvzip", 128, "t", "s", 0, prefill_s=1.0, select_s=0.2, pass_s=4.0)) == pytest.approx(5.2)
    with pytest.raises(DapqError, match="kv_bytes_peak"):
        row_peak({"sample_id": "x", "method_key": "m"})


def test_points_from_rows_and_their_front():
    points, _, _ = group_points(_ruler_rows())
    by = {p.name: p for p in points}
    assert [p.name for p in points] == ["full", "dapq 128", "snapkv 128", "snapkv 64", "dapq 64"]  # accuracy first
    assert by["dapq 128"].ttft_s == pytest.approx(1.3) and by["dapq 128"].peak_bytes == 9 * MiB
    assert by["full"].budget_label == "full" and by["full"].samples == 4
    assert {p.name for p in points if p.on_front} == {"full", "dapq 128", "snapkv 128", "snapkv 64"}


# ---------------------------------------------------------------------------------------------------- --ttft / --memory
def test_bench_files_override_the_row_values_where_they_measured(tmp_path):
    run = _write_run(tmp_path / "run", _ruler_rows())
    ttft = tmp_path / "ttft.json"
    memory = tmp_path / "memory.json"
    # measured at budget 128: dapq's own prefill is no slower than snapkv's; 1000 and 2000 tokens (rows: 1900)
    ttft.write_text(json.dumps(_bench("ttft", 128, {"full": {2000: 3.0}, "snapkv": {1000: 0.5, 2000: 2.0}})))
    memory.write_text(json.dumps(_bench("memory", 128, {"full": {2000: 100 * MiB}, "dapq": {2000: 7 * MiB}})))
    report = write_front([run], ttft=ttft, memory=memory, out=tmp_path / "out", console=_quiet(tmp_path))
    md = report.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert "measured peak MiB" in header and "measured TTFT s" in header and "accounted" not in header
    table = {line.split(" | ")[0] + " " + line.split(" | ")[1]: line for line in md.splitlines() if line[:2] == "| "}
    # full: both measured (any bench budget); snapkv 128: TTFT at the nearest length, 2000; dapq 128: peak measured
    assert "| full | full | 90.00 | 100.00 | 3.000 | 4 | yes |" in md, md
    assert "| snapkv 128" in table and "| 9.00† | 2.000 |" in table["| snapkv 128"], table
    assert "| 7.00 | 1.300‡ |" in table["| dapq 128"], table
    # other budgets than the bench's fall back to the rows, footnoted
    assert "| 6.00† | 1.100‡ |" in table["| snapkv 64"], table
    assert "† not measured in memory.json" in md and "‡ not measured in ttft.json" in md
    assert "at 2000 tokens, the nearest measured length" in md


def test_one_bench_file_per_budget_each_matches_its_own_budget(tmp_path):
    run = _write_run(tmp_path / "run", _ruler_rows())
    m64, m128 = tmp_path / "memory-64.json", tmp_path / "memory-128.json"
    m64.write_text(json.dumps(_bench("memory", 64, {"snapkv": {2000: 4 * MiB}, "dapq": {2000: 5 * MiB}})))
    m128.write_text(json.dumps(_bench("memory", 128, {"full": {2000: 100 * MiB}, "dapq": {2000: 7 * MiB}})))
    md = write_front([run], memory=[m64, m128], out=tmp_path / "out", console=_quiet(tmp_path)).read_text()
    table = {line.split(" | ")[0] + " " + line.split(" | ")[1]: line for line in md.splitlines() if line[:2] == "| "}
    assert "| 4.00 |" in table["| snapkv 64"] and "| 5.00 |" in table["| dapq 64"], table  # the 64 file
    assert "| 7.00 |" in table["| dapq 128"] and "| 100.00 |" in table["| full full"], table  # the 128 file
    assert "| 9.00† |" in table["| snapkv 128"], table  # in neither file at its budget: the rows' value
    assert "memory-64.json (budget 64), memory-128.json (budget 128)" in md, md
    # the CLI takes the option twice
    assert main(["report", "--front", str(run), "--memory", str(m64), "--memory", str(m128)]) == 0
    # two files of one budget: which one to read is ambiguous, refused in one line
    with pytest.raises(DapqError, match="pass one file per budget"):
        write_front([run], memory=[m128, m128], console=_quiet(tmp_path))


def test_a_bench_file_of_the_wrong_kind_is_refused(tmp_path):
    run = _write_run(tmp_path / "run", _ruler_rows())
    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps(_bench("memory", 128, {"dapq": {2000: 7 * MiB}})))
    with pytest.raises(DapqError, match="not a `dapq bench ttft` result"):
        write_front([run], ttft=memory, console=_quiet(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DapqError, match="is not JSON"):
        write_front([run], memory=tmp_path / "bad.json", console=_quiet(tmp_path))


# ---------------------------------------------------------------------------------------------------- files
def test_front_md_and_png_are_written_into_the_run_folder(tmp_path):
    run = _write_run(tmp_path / "run", _ruler_rows())
    report = write_front([run], console=_quiet(tmp_path))
    assert report == run / "front.md"
    md = report.read_text()
    assert "accounted KV peak MiB" in md and "harness TTFT s (shared prefill)" in md
    assert "| dapq | 64 | 40.00 | 6.00 | 1.300 | 4 |  |" in md, md  # dominated: blank front cell
    assert "Front (no other point" in md and ": full, dapq 128, snapkv 128, snapkv 64." in md, md
    assert "![front](front.png)" in md
    assert (run / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dapq 128" in (tmp_path / "console.txt").read_text()  # the table went to the terminal too


def test_two_lengths_get_a_section_and_a_figure_each(tmp_path):
    rows = _ruler_rows()
    for r in _ruler_rows():
        rows.append({**r, "sample_id": r["sample_id"] + "-4k", "metadata": {"length": 4096}, "score": r["score"] / 2})
    run = _write_run(tmp_path / "run", rows)
    md = write_front([run], console=_quiet(tmp_path)).read_text()
    part2k, part4k = md.split("## 4096-token prompts")
    assert "## 2048-token prompts" in part2k and "| full | full | 90.00 |" in part2k
    assert "| full | full | 45.00 |" in part4k
    assert (run / "front_L2048.png").is_file() and (run / "front_L4096.png").is_file()


def test_niah_of_mixed_lengths_is_one_group(tmp_path):
    rows = [
        _row(m, b, "niah", f"niah-L{n}-d0", s, metadata={"length": n, "depth": 0})
        for m, b, s in (("full", None, 100.0), ("snapkv", 64, 50.0))
        for n in (1000, 2000)
    ]
    run = _write_run(tmp_path / "run", rows)
    md = write_front([run], console=_quiet(tmp_path)).read_text()
    assert "## " not in md and "| snapkv | 64 | 50.00 |" in md
    assert sorted(p.name for p in run.glob("*.png")) == ["front.png"]


def test_several_runs_merge_and_a_run_given_twice_counts_once(tmp_path):
    rows = _ruler_rows()
    a = _write_run(tmp_path / "a", [r for r in rows if r["budget"] != 64])
    b = _write_run(tmp_path / "b", [r for r in rows if r["budget"] == 64])
    md = write_front([a, b, a], out=tmp_path / "out", console=_quiet(tmp_path)).read_text()
    assert "| snapkv | 64 |" in md and "| snapkv | 128 |" in md and "| 4 | yes |" in md
    assert "| 8 |" not in md  # a read twice would double the samples
    merged, dropped = load_runs([tmp_path, a])  # the parent holds a and b: a's file read once
    assert len(merged) == len(rows) and dropped == 0
    copy = _write_run(tmp_path / "copy", rows[:3])  # the same rows in another folder of the same configuration
    merged, dropped = load_runs([a, b, copy])
    assert len(merged) == len(rows) and dropped == 3


def test_runs_of_two_models_are_never_one_front(tmp_path):
    a = _write_run(tmp_path / "a", _ruler_rows())
    b = _write_run(tmp_path / "b", _ruler_rows(), {**SETTINGS, "model": "other"})
    md = write_front([a, b], out=tmp_path / "out", console=_quiet(tmp_path)).read_text()
    assert md.count("## Configuration") == 2
    assert (tmp_path / "out" / "config1_front.png").is_file() and (tmp_path / "out" / "config2_front.png").is_file()


def test_niah_and_ruler_rows_are_never_one_avg_even_without_run_json(tmp_path):
    """Folders written before run.json: their configuration is the rows' model/mode/seed, the same for both
    benchmarks; the front still splits them by benchmark."""
    niah = [_row(m, b, "niah", "niah-L2048-d0", s) for m, b, s in (("full", None, 100.0), ("snapkv", 64, 20.0))]
    ruler = [r for r in _ruler_rows() if r["method"] in ("full", "snapkv")]
    for folder, rows in (("niah", niah), ("ruler", ruler)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = write_front([tmp_path], console=_quiet(tmp_path)).read_text()
    part_niah, part_ruler = md.split("## ruler, 2048-token prompts")
    assert "## niah, 2048-token prompts" in part_niah and "| snapkv | 64 | 20.00 |" in part_niah
    assert "| snapkv | 64 | 40.00 |" in part_ruler
    assert (tmp_path / "niah_front.png").is_file() and (tmp_path / "ruler_front.png").is_file()


# ---------------------------------------------------------------------------------------------------- the CLI
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_front_exit_2_with_one_line_on_bad_input(tmp_path, capsys):
    assert main(["report", "--front", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", "--front", str(tmp_path / "empty")]) == 2
    assert "No results.jsonl" in _one_error_line(capsys)
    run = _write_run(tmp_path / "run", _ruler_rows())
    (tmp_path / "ttft.json").write_text(json.dumps({"kind": "throughput", "rows": {}}))
    assert main(["report", "--front", str(run), "--ttft", str(tmp_path / "ttft.json")]) == 2
    assert "kind 'throughput'" in _one_error_line(capsys)
    assert not (run / "front.md").exists()
    _write_run(tmp_path / "blank", [])
    assert main(["report", "--front", str(tmp_path / "blank")]) == 2
    assert "No scored rows" in _one_error_line(capsys)


def test_cli_without_front_takes_one_path_and_no_front_options(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _ruler_rows())
    assert main(["report", str(run), str(run)]) == 2
    assert "one path" in _one_error_line(capsys)
    assert main(["report", str(run), "--ttft", "x.json"]) == 2
    assert "only go with --front" in _one_error_line(capsys)


def test_cli_plain_report_still_works_and_front_runs(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _ruler_rows())
    assert main(["report", str(run)]) == 0
    assert "| snapkv | 40.00 | 40.00 | 40.00 |" in (run / "report.md").read_text()
    assert not (run / "front.md").exists()
    assert main(["report", "--front", str(run), "--out", str(tmp_path / "front")]) == 0
    assert (tmp_path / "front" / "front.md").is_file() and (tmp_path / "front" / "front.png").is_file()
    assert "front" in capsys.readouterr().out


def test_same_samples_keeps_only_the_samples_every_point_scored():
    from dapq.report.front import common_samples, front_groups

    rows = [
        _row("full", None, "ruler/a", "s1", 100),
        _row("full", None, "ruler/a", "s2", 0),
        _row("snapkv", 128, "ruler/a", "s1", 100),  # only s1: with the same samples full's accuracy is 100, not 50
    ]
    assert {r["sample_id"] for r in common_samples(rows)} == {"s1"}
    (loose,) = front_groups(rows)
    (same,) = front_groups(rows, same_samples=True)
    assert {p.name: p.accuracy for p in loose.points}["full"] == 50
    assert {p.name: p.accuracy for p in same.points}["full"] == 100


def test_methods_are_picked_before_same_samples(tmp_path):
    rows = [
        _row("full", None, "ruler/a", "s1", 100),
        _row("full", None, "ruler/a", "s2", 0),
        _row("snapkv", 128, "ruler/a", "s1", 100),
        _row("snapkv", 128, "ruler/a", "s2", 50),
        _row("speckv", 128, "ruler/a", "s1", 100),  # only s1: it would shrink the others to s1
    ]
    run = _write_run(tmp_path / "run", rows)
    md = write_front([run], out=tmp_path / "all", console=_quiet(tmp_path), same_samples=True).read_text()
    assert "| full | full | 100.00 |" in md and "| 1 |" in md
    md = write_front(
        [run], out=tmp_path / "two", console=_quiet(tmp_path), same_samples=True, methods=["full", "snapkv"]
    ).read_text()
    assert "speckv" not in md.split("Methods:")[1].split("\n", 1)[1], "a left-out method has no point"
    assert "| full | full | 50.00 |" in md and "| snapkv | 128 | 75.00 |" in md and "| 2 |" in md
    with pytest.raises(DapqError, match="Methods there: full, snapkv, speckv"):
        write_front([run], out=tmp_path / "x", console=_quiet(tmp_path), methods=["full", "laq"])
    assert main(["report", "--front", str(run), "--methods", "full,snapkv", "--out", str(tmp_path / "cli")]) == 0
    assert main(["report", str(run), "--methods", "full"]) == 2, "--methods only goes with --front"
