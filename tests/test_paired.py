"""`dapq report RUN --paired A,B`: the AVG difference of two methods on the prompts both scored, with a
task-stratified paired-bootstrap interval, checked against the report's own AVG and against the normal
approximation of the same standard error."""

from __future__ import annotations

import json
import math
import random

import pytest

from dapq.cli import main
from dapq.errors import DapqError
from dapq.report.paired import paired, parse_pair
from dapq.report.tables import summarize, task_average


def _row(method: str, budget, task: str, i: int, score: float) -> dict:
    return {
        "sample_id": f"{task}-s{i}",
        "task": f"ruler/{task}",
        "method": method,
        "method_key": method,
        "budget": budget,
        "score": score,
        "metadata": {"length": 2048},
    }


def _grid(seed: int = 0, per_task: dict[str, int] | None = None) -> list[dict]:
    """Three methods with random 0/100 and partial scores; tasks of unequal sizes."""
    rng = random.Random(seed)
    per_task = per_task or {"a": 7, "b": 12, "c": 4}
    rows = []
    for task, n in per_task.items():
        for i in range(n):
            rows.append(_row("full", None, task, i, 100.0 * (rng.random() < 0.8)))
            for budget in (64, 128):
                rows.append(_row("x", budget, task, i, 100.0 * (rng.random() < 0.5)))
                rows.append(_row("y", budget, task, i, round(100 * rng.random(), 1)))
    return rows


def test_difference_is_the_difference_of_the_report_avgs():
    rows = _grid()
    tasks, _, _, means = summarize(rows)
    for p in paired(rows, "x", "y", n_boot=200):
        expected = task_average(tasks, means, "x", p.budget) - task_average(tasks, means, "y", p.budget)
        assert p.diff == pytest.approx(expected)
        assert p.tasks == 3 and p.samples == 23
        assert p.wins + p.losses + p.ties == 23
        assert p.low <= p.diff <= p.high


def test_wins_losses_ties_count_prompts():
    rows = _grid()
    x = {(r["sample_id"], r["budget"]): r["score"] for r in rows if r["method_key"] == "x"}
    y = {(r["sample_id"], r["budget"]): r["score"] for r in rows if r["method_key"] == "y"}
    p64 = next(p for p in paired(rows, "x", "y", n_boot=10) if p.budget == 64)
    keys = [k for k in x if k[1] == 64]
    assert p64.wins == sum(x[k] > y[k] for k in keys)
    assert p64.losses == sum(x[k] < y[k] for k in keys)


def test_a_method_against_itself_is_zero_with_no_spread():
    rows = _grid()
    rows += [dict(r, method_key="x2") for r in rows if r["method_key"] == "x"]
    for p in paired(rows, "x", "x2", n_boot=500):
        assert (p.diff, p.low, p.high, p.p_not_better) == (0.0, 0.0, 0.0, 1.0)
        assert p.ties == p.samples


def test_a_constant_shift_is_exact():
    rows = _grid()
    rows += [dict(r, method_key="x5", score=r["score"] + 5.0) for r in rows if r["method_key"] == "x"]
    for p in paired(rows, "x5", "x", n_boot=500):
        assert p.diff == pytest.approx(5.0) and p.low == pytest.approx(5.0) and p.high == pytest.approx(5.0)
        assert p.p_not_better == 0.0 and p.wins == p.samples


def test_only_prompts_both_scored_count():
    rows = _grid()
    base = paired(rows, "x", "y", n_boot=300)
    extra = [_row("x", 64, "a", 100 + i, 100.0) for i in range(5)] + [_row("x", 64, "d", 0, 0.0)]
    again = paired(rows + extra, "x", "y", n_boot=300)
    assert again == base, "rows only one side has must not change the comparison"


def test_budgetless_fullkv_pairs_with_every_budget():
    rows = _grid()
    found = paired(rows, "x", "full", n_boot=50)
    assert [p.budget for p in found] == [64, 128]
    tasks, _, _, means = summarize(rows)
    assert found[0].diff == pytest.approx(
        task_average(tasks, means, "x", 64) - task_average(tasks, means, "full", None)
    )


def test_interval_matches_the_normal_approximation():
    """Independent reference: the stratified mean's standard error is sqrt(sum_t s_t^2 / n_t) / T; with large
    tasks the percentile interval is close to diff +- 1.96 se."""
    rows = _grid(seed=3, per_task={"a": 300, "b": 200, "c": 250})
    p = next(q for q in paired(rows, "x", "y", n_boot=4000, seed=1) if q.budget == 128)
    by_task: dict[str, list[float]] = {}
    score = {(r["method_key"], r["sample_id"]): r["score"] for r in rows if r["budget"] in (128,)}
    for (m, sid), s in score.items():
        if m == "x":
            by_task.setdefault(sid.split("-")[0], []).append(s - score[("y", sid)])
    var = 0.0
    for d in by_task.values():
        mu = sum(d) / len(d)
        var += sum((v - mu) ** 2 for v in d) / len(d) / len(d)  # the bootstrap's plug-in variance of a mean
    se = math.sqrt(var) / len(by_task)
    assert (p.high - p.low) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert (p.high + p.low) / 2 == pytest.approx(p.diff, abs=0.15 * se)


def test_same_seed_same_interval_and_seed_matters():
    rows = _grid()
    assert paired(rows, "x", "y", n_boot=300, seed=4) == paired(rows, "x", "y", n_boot=300, seed=4)
    assert paired(rows, "x", "y", n_boot=300, seed=4) != paired(rows, "x", "y", n_boot=300, seed=5)


def test_bad_pairs_are_one_line_errors():
    with pytest.raises(DapqError, match="Methods there: full, x"):
        parse_pair("x,laq", ["full", "x"])
    for text in ("x", "x,x", "x,", "x,y,z"):
        with pytest.raises(DapqError, match="two different method keys"):
            parse_pair(text, ["x", "y", "z"])
    keys = ["learned", "speckv,draft=self", "laq"]  # a key with parameters holds a comma
    assert parse_pair("learned,speckv,draft=self", keys) == ("learned", "speckv,draft=self")
    assert parse_pair("speckv,draft=self, laq", keys) == ("speckv,draft=self", "laq")
    with pytest.raises(DapqError, match="can be read as"):
        parse_pair("a,b,c", ["a", "b", "c", "a,b", "b,c"])
    rows = _grid()
    with pytest.raises(DapqError, match="two rows"):
        paired(rows + [rows[1]], "x", "y")
    with pytest.raises(DapqError, match="n_boot"):
        paired(rows, "x", "y", n_boot=0)


def _folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "results.jsonl", "w") as f:
        for r in _grid():
            f.write(json.dumps(r) + "\n")
    return run


def test_cli_paired_section_in_report_md(tmp_path, capsys):
    run = _folder(tmp_path)
    assert main(["report", str(run), "--paired", "x,y", "--paired", "x,full", "--bootstrap", "200"]) == 0
    md = (run / "report.md").read_text()
    assert "### Paired comparisons" in md and "200 task-stratified" in md
    rows = [line for line in md.splitlines() if line.startswith(("| x | y |", "| x | full |"))]
    assert len(rows) == 4, rows  # two pairs x two budgets
    p = paired(_grid(), "x", "y", n_boot=200)[0]
    assert f"| x | y | 64 | 3 | 23 | {p.diff:+.2f} | [{p.low:+.2f}, {p.high:+.2f}] |" in md


def test_cli_paired_bad_input_exits_2(tmp_path, capsys):
    run = _folder(tmp_path)
    assert main(["report", str(run), "--paired", "x,laq"]) == 2
    assert "Methods there" in capsys.readouterr().err
    assert main(["report", str(run), "--bootstrap", "100"]) == 2
    assert main(["report", str(run), "--paired", "x,y", "--bootstrap", "0"]) == 2
    assert main(["report", "--front", str(run), "--paired", "x,y"]) == 2
    assert not (run / "report.md").exists(), "a refused call writes nothing"


# -------------------------------------------------------------------------------------------------------- --group
def _group_rows(md: str, title: str) -> list[str]:
    """The table rows of the paired section whose heading holds `title`."""
    out, inside = [], False
    for line in md.splitlines():
        if line.startswith("### "):
            inside = title in line
        elif inside and line.startswith("| x |"):
            out.append(line)
    return out


def test_cli_group_pairs_within_each_group_and_the_rest(tmp_path, capsys):
    grid = _grid(per_task={"a": 7, "b": 12, "c": 4, "d": 5})
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grid))
    argv = ["report", str(run), "--paired", "x,y", "--bootstrap", "300", "--group", "ab=a,b"]
    assert main(argv) == 0
    md = (run / "report.md").read_text()
    ab = _group_rows(md, "task group ab (2 tasks: a, b)")
    rest = _group_rows(md, "task group the rest (2 tasks: c, d)")
    assert len(ab) == 2 and len(rest) == 2, md
    # each group's rows are `paired` on that group's rows alone, computed here independently of the report
    for lines, tasks in ((ab, {"a", "b"}), (rest, {"c", "d"})):
        subset = [r for r in grid if r["task"].split("/")[1] in tasks]
        for line, p in zip(lines, paired(subset, "x", "y", n_boot=300), strict=True):
            n = sum(1 for r in subset if r["method_key"] == "x" and r["budget"] == p.budget)
            assert line.startswith(f"| x | y | {p.budget} | 2 | {n} | {p.diff:+.2f} | [{p.low:+.2f}, {p.high:+.2f}] |")
    # the overall table is still there, over all four tasks
    overall = paired(grid, "x", "y", n_boot=300)[0]
    assert f"| x | y | 64 | 4 | 28 | {overall.diff:+.2f} |" in md
    # a group's difference is not the overall one (the groups split the tasks)
    assert ab[0] != rest[0]


def test_group_of_every_task_leaves_no_rest(tmp_path, capsys):
    run = _folder(tmp_path)
    assert main(["report", str(run), "--paired", "x,y", "--bootstrap", "50", "--group", "g=a,b,c"]) == 0
    md = (run / "report.md").read_text()
    assert "task group g (3 tasks: a, b, c)" in md and "the rest" not in md


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--group", "ab=a,b"], "--group only goes with --paired"),
        (["--paired", "x,y", "--group", "a,b"], "--group takes NAME=task"),
        (["--paired", "x,y", "--group", "ab="], "--group takes NAME=task"),
        (["--paired", "x,y", "--group", "=a"], "--group takes NAME=task"),
        (["--paired", "x,y", "--group", "ab=a,zz"], "no rows of task zz in these results. Tasks there: a, b, c"),
        (["--paired", "x,y", "--group", "g1=a", "--group", "g2=a,b"], "task a is in both g1 and g2"),
        (["--paired", "x,y", "--group", "g=a", "--group", "g=b"], "the name 'g' is given twice"),
        (["--paired", "x,y", "--group", "the rest=a"], "give yours another name"),
        (["--front", "--group", "g=a"], "do not go with --front"),
    ],
)
def test_cli_bad_groups_are_one_line_errors(tmp_path, capsys, argv, expected):
    run = _folder(tmp_path)
    argv = ["report", *argv[:1], str(run), *argv[1:]] if argv[0] == "--front" else ["report", str(run), *argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err
    assert not (run / "report.md").exists(), "a refused call writes nothing"
