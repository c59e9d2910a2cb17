"""`dapq ablate content|length|position` (paper Figure 4): variant lists, summaries, outputs, skips and resume.

Runs use the tiny random llama and the character tokenizer (no downloads); summaries are checked on hand-made rows.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import dapq.models
from dapq.analysis import ablate, ablate_report
from dapq.cli import ablate as ablate_cli
from dapq.cli.args import parse_budgets
from dapq.errors import DapqError
from dapq.runs import RESULTS, load_rows
from dapq.tasks.sample import Sample
from helpers import TinyTokenizer, build_tiny, toy_samples

TOK = TinyTokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls run fastest on one thread (and do not fight a busy CPU); restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(n: int, chars: int = 60) -> list[Sample]:
    return toy_samples(n, chars, max_new_tokens=3)


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _row(label: str, budget: Any, score: float, sid: str, method: str = "dapq", **cfg: Any) -> dict[str, Any]:
    return {
        "sample_id": sid,
        "task": "toy",
        "method": method,
        "method_key": label,
        "method_config": cfg,
        "budget": budget,
        "score": score,
    }


# ---------------------------------------------------------------------------------------------------- variant lists
def test_content_variants_are_the_papers_at_n32():
    items = ablate.variants("content")
    contents = ["F4_L28", "F8_L24", "F2_L30", "RS_C", "RC_C", "Fix_C", "random_vocab"]
    assert [v.label for v in items] == [f"dapq[{c}]" for c in contents] + ["SnapKV", "FullKV"], [v.label for v in items]
    for v, content in zip(items, contents):
        assert v.spec.name == "dapq" and v.spec.key == f"dapq[{content}]", v.spec
        assert dict(v.spec.params) == {"n_pseudo_tokens": 32, "content": content, "seed": 0}, v.spec.params
        assert v.group == "content" and v.value == content, v
    snap, full = items[-2:]
    assert snap.spec.name == "snapkv" and dict(snap.spec.params) == {"window": 32}, snap.spec
    assert full.spec.name == "full" and not full.spec.uses_budget and full.group == "reference", full.spec


def test_length_variants_use_auto_content_and_values_override():
    items = ablate.variants("length")
    ns = [1, 2, 4, 8, 16, 32, 64, 128]
    assert [v.label for v in items[:-2]] == [f"dapq[N={n}]" for n in ns], [v.label for v in items]
    for v, n in zip(items, ns):
        assert dict(v.spec.params) == {"n_pseudo_tokens": n, "content": "auto", "seed": 0}, v.spec.params
        assert v.value == n, v
    values = ablate.parse_values("length", "1, 8,32")
    assert values == [1, 8, 32], values
    custom = ablate.variants("length", values, seed=3)
    assert [v.label for v in custom] == ["dapq[N=1]", "dapq[N=8]", "dapq[N=32]", "SnapKV", "FullKV"], custom
    assert dict(custom[1].spec.params)["seed"] == 3, "the seed must reach every DapQ variant"


def test_position_variants_split_into_inside_and_shifted():
    items = ablate.variants("position")
    labels = [v.label for v in items]
    want = [f"dapq[part{k}]" for k in (1, 2, 3)] + [f"dapq[+{o}]" for o in (0, 32, 64, 128, 256, 512)]
    assert labels == want + ["SnapKV", "FullKV"], labels
    for k, v in enumerate(items[:3], start=1):
        assert dict(v.spec.params) == {"n_pseudo_tokens": 32, "content": "auto", "insert_part": k, "seed": 0}, v
        assert v.group == ablate.INSIDE, v
    for o, v in zip((0, 32, 64, 128, 256, 512), items[3:9]):
        assert dict(v.spec.params) == {"n_pseudo_tokens": 32, "content": "auto", "position_offset": o, "seed": 0}, v
        assert v.group == ablate.SHIFTED, v
    parsed = ablate.parse_values("position", "part2,+16,48")
    assert parsed == ["part2", 16, 48], parsed
    assert [v.label for v in ablate.variants("position", parsed, references=False)] == [
        "dapq[part2]",
        "dapq[+16]",
        "dapq[+48]",
    ]


def test_default_values_scale_with_another_n():
    assert ablate.default_values("content", 8)[:3] == ["F1_L7", "F2_L6", "F0_L8"], ablate.default_values("content", 8)
    assert ablate.default_values("position", 8)[3:] == [0, 8, 16, 32, 64, 128], ablate.default_values("position", 8)
    items = ablate.variants("content", n_pseudo=8)  # every default content must be valid for N = 8
    assert all(dict(v.spec.params)["n_pseudo_tokens"] == 8 for v in items[:-2]), items


@pytest.mark.parametrize(
    "kind, text, match",
    [
        ("length", "1,x", "length takes"),
        ("length", "0", "N >= 1"),
        ("length", "8,8", "repeats"),
        ("position", "part4", "part1, part2 and part3"),
        ("position", "-32", ">= 0"),
        ("position", "middle", "position takes"),
        ("content", " , ", "empty"),
        ("speed", "1", "Unknown ablation 'speed'"),
    ],
)
def test_bad_values_give_dapq_errors(kind, text, match):
    with pytest.raises(DapqError, match=match):
        ablate.parse_values(kind, text)


def test_bad_contents_tasks_and_budgets_give_dapq_errors():
    with pytest.raises(DapqError, match=r"Bad value 'F4_L20'.*gives 24 tokens"):
        ablate.variants("content", ["F4_L20"])
    with pytest.raises(DapqError, match="Bad value 'poetry'.*F<m>_L<n>"):
        ablate.variants("content", ["poetry"])
    with pytest.raises(DapqError, match="Unknown task 'longbench/qasper'"):
        ablate.build_samples(TOK, "longbench/qasper", [100], 2)
    with pytest.raises(DapqError, match="Unknown RULER task 'nope'"):
        ablate.check_task("ruler/nope")
    with pytest.raises(DapqError, match="--budgets takes"):
        parse_budgets("64,abc")
    with pytest.raises(DapqError, match="ratio in"):
        parse_budgets("0")
    assert parse_budgets("64, 128,0.1") == [64, 128, 0.1]


# ---------------------------------------------------------------------------------------------------- summaries
def test_summary_means_equal_hand_computed_means():
    rows = []
    table = {  # label -> budget -> scores of s0, s1, s2
        "dapq[N=1]": {16: [0.0, 100.0, 50.0], 32: [100.0, 100.0, 0.0]},
        "dapq[N=8]": {16: [100.0, 100.0, 100.0], 32: [20.0, 40.0]},  # one sample missing at 32
        "SnapKV": {16: [0.0, 0.0, 30.0], 32: [10.0, 20.0, 30.0]},
        "FullKV": {None: [100.0, 50.0, 0.0]},
    }
    method = {"dapq[N=1]": "dapq", "dapq[N=8]": "dapq", "SnapKV": "snapkv", "FullKV": "full"}
    for label in ["SnapKV", "dapq[N=8]", "FullKV", "dapq[N=1]"]:  # references first: the summary reorders
        for budget, scores in table[label].items():
            for i, score in enumerate(scores):
                n = int(label[7:-1]) if label.startswith("dapq") else None
                rows.append(_row(label, budget, score, f"s{i}", method[label], n_pseudo_tokens=n))
    summary = ablate_report.summarize(rows, "length")
    assert summary["budgets"] == [16, 32], summary["budgets"]
    labels = [v["label"] for v in summary["variants"]]
    assert labels == ["dapq[N=8]", "dapq[N=1]", "SnapKV", "FullKV"], f"references must come last: {labels}"
    by = {v["label"]: v for v in summary["variants"]}
    for label, per in table.items():
        for budget, scores in per.items():
            cell = by[label]["scores"][ablate_report.budget_key(budget)]
            want = sum(scores) / len(scores)
            assert cell["mean"] == pytest.approx(want), f"{label} B={budget}: {cell['mean']} != {want}"
            assert cell["n"] == len(scores), f"{label} B={budget}: n={cell['n']}, want {len(scores)}"
    assert by["dapq[N=8]"]["value"] == 8 and by["dapq[N=8]"]["group"] == "length", by["dapq[N=8]"]
    assert by["FullKV"]["group"] == "reference" and by["FullKV"]["value"] is None, by["FullKV"]
    md = ablate_report.markdown(summary)
    fullkv_line = next(line for line in md.splitlines() if line.startswith("| FullKV"))
    assert fullkv_line.count("50.00") == 2, f"FullKV (no budget) should fill every budget column: {fullkv_line}"
    n1_line = next(line for line in md.splitlines() if line.startswith("| dapq[N=1]"))
    assert "50.00" in n1_line and "66.67" in n1_line, n1_line
    only = ablate_report.summarize(rows, "length", labels=["dapq[N=1]", "FullKV"])
    assert [v["label"] for v in only["variants"]] == ["dapq[N=1]", "FullKV"], "labels must filter the rows"


def test_coefficient_of_variation_of_content_means():
    rows = []
    for label, scores in {"dapq[F4_L28]": [10, 10], "dapq[RS_C]": [20, 20], "dapq[Fix_C]": [0, 60]}.items():
        for i, s in enumerate(scores):
            rows.append(_row(label, 64, float(s), f"s{i}", content=label[5:-1], n_pseudo_tokens=32))
    rows += [_row("SnapKV", 64, 1000.0, "s0", "snapkv"), _row("FullKV", None, 5.0, "s0", "full")]
    summary = ablate_report.summarize(rows, "content")
    means = [10.0, 20.0, 30.0]
    want = statistics.pstdev(means) / statistics.fmean(means)
    cv = summary["cv"]["64"]
    assert cv["n_variants"] == 3, f"only the content variants count, not SnapKV/FullKV: {cv}"
    assert cv["cv"] == pytest.approx(want) and cv["cv"] == pytest.approx(0.408248, abs=1e-6), cv
    assert ablate_report.coefficient_of_variation([7.0]) is None, "one value has no spread"
    assert ablate_report.coefficient_of_variation([0.0, 0.0]) is None, "a zero mean has no relative spread"
    assert ablate_report.coefficient_of_variation([50.0, 50.0, 50.0]) == 0.0
    assert "40.82%" in ablate_report.markdown(summary), ablate_report.markdown(summary)


# ---------------------------------------------------------------------------------------------------- running
CASES = {
    "content": ["F1_L7", "RS_C", "Fix_C"],
    "length": [1, 4, 8],
    "position": ["part1", "part3", 0, 16],
}


@pytest.mark.parametrize("kind", list(CASES))
def test_running_an_ablation_writes_rows_json_md_and_png(tmp_path, kind):
    model, samples, budgets = build_tiny("llama"), _samples(2), [16, 40]
    summary = ablate.run_ablation(
        model, TOK, samples, kind, budgets, tmp_path, values=CASES[kind], n_pseudo=8, console=_quiet()
    )
    rows = load_rows(tmp_path / RESULTS)
    labels = [v.label for v in ablate.variants(kind, CASES[kind], n_pseudo=8, references=False)]
    want = {(s.id, label, b) for s in samples for label in labels for b in budgets}
    want |= {(s.id, "SnapKV", 40) for s in samples}  # SnapKV's 32-token window does not fit budget 16: skipped
    want |= {(s.id, "FullKV", None) for s in samples}
    got = [(r["sample_id"], r["method_key"], r["budget"]) for r in rows]
    assert len(got) == len(set(got)), f"duplicate rows: {got}"
    assert set(got) == want, f"missing {sorted(want - set(got), key=str)}, extra {sorted(set(got) - want, key=str)}"
    assert any("SnapKV at budget 16" in note for note in summary["skipped"]), summary["skipped"]
    stem = tmp_path / f"ablate-{kind}"
    on_disk = json.loads(stem.with_suffix(".json").read_text())
    assert on_disk["variants"] == summary["variants"], "the JSON file must hold the returned summary"
    by = {v["label"]: v for v in on_disk["variants"]}
    for label in labels:
        for b in budgets:
            scores = [r["score"] for r in rows if r["method_key"] == label and r["budget"] == b]
            cell = by[label]["scores"][str(b)]
            assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(scores) / 2), f"{label} B={b}: {cell}"
    if kind == "content":
        assert set(on_disk["cv"]) == {"16", "40"} and on_disk["cv"]["16"]["n_variants"] == 3, on_disk["cv"]
    md = stem.with_suffix(".md").read_text()
    for label in [*labels, "SnapKV", "FullKV"]:
        assert f"| {label} |" in md, f"{label} missing from the markdown table:\n{md}"
    assert "B=16" in md and "B=40" in md, md
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, f"not a real PNG ({len(png)} bytes)"


def test_rerun_resumes_without_duplicate_rows(tmp_path):
    model, samples = build_tiny("llama"), _samples(2)
    args = dict(values=[1, 8], n_pseudo=8, console=_quiet())
    ablate.run_ablation(model, TOK, samples, "length", [40], tmp_path, **args)
    before = (tmp_path / RESULTS).read_text()
    assert before.count("\n") == 2 * (2 + 1 + 1), f"2 samples x (2 DapQ + SnapKV + FullKV) rows:\n{before}"
    summary = ablate.run_ablation(model, TOK, samples, "length", [40], tmp_path, **args)
    assert (tmp_path / RESULTS).read_text() == before, "a finished ablation must not write rows again"
    assert all(c["n"] == 2 for v in summary["variants"] for c in v["scores"].values()), summary["variants"]
    narrower = ablate.run_ablation(model, TOK, samples, "length", [16], tmp_path, **{**args, "values": [1]})
    labels = [v["label"] for v in narrower["variants"]]
    assert labels == ["dapq[N=1]", "FullKV"] and narrower["budgets"] == [16], (
        f"a reused folder must summarise only this command's variants and budgets: {labels}, {narrower['budgets']}"
    )


def test_variants_that_cannot_be_placed_are_skipped_with_a_note(tmp_path):
    console = _quiet()
    summary = ablate.run_ablation(
        build_tiny("llama"), TOK, _samples(2), "position", [16], tmp_path, values=["part1", 0], console=console
    )
    printed = console.file.getvalue()
    assert "skipped dapq[part1]" in printed and "insert_part=1" in printed, printed
    assert "skipped SnapKV at budget 16" in printed, printed
    got = {(r["method_key"], r["budget"]) for r in load_rows(tmp_path / RESULTS)}
    assert got == {("dapq[+0]", 16), ("FullKV", None)}, got
    assert [v["label"] for v in summary["variants"]] == ["dapq[+0]", "FullKV"], summary["variants"]
    md = (tmp_path / "ablate-position.md").read_text()
    assert "skipped dapq[part1]" in md, md


# ---------------------------------------------------------------------------------------------------- the CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapq")
    sub = parser.add_subparsers(dest="command", required=True)
    ablate_cli.add_parser(sub)
    return parser


def test_cli_runs_into_the_config_hashed_folder(tmp_path, monkeypatch):
    model = build_tiny("llama")
    calls = []

    def fake_samples(tok, task, lengths, n, seed=0, data_dir=None):
        calls.append((task, lengths, n, seed))
        return _samples(n)

    monkeypatch.setattr(dapq.models, "load_model", lambda *a, **k: (model, TOK))
    monkeypatch.setattr(ablate, "build_samples", fake_samples)
    monkeypatch.chdir(tmp_path)
    argv = ["ablate", "length", "--values", "1,8", "--budgets", "40", "--samples", "2", "--lengths", "1k"]
    args = _parser().parse_args(argv)
    assert args.func is ablate_cli.cmd_ablate, "add_parser must set func"
    console = _quiet()
    assert args.func(args, console) == 0
    assert calls == [("niah", [1000], 2, 0)], f"defaults: task niah, the parsed lengths, --samples: {calls}"
    folders = list((tmp_path / "runs").glob("ablate-length-*"))
    assert len(folders) == 1, f"one runs/ablate-length-<hash> folder: {folders}"
    for name in (RESULTS, "ablate-length.json", "ablate-length.md", "ablate-length.png"):
        assert (folders[0] / name).is_file(), f"{name} missing in {folders[0]}"
    assert "dapq[N=8]" in console.file.getvalue(), "the table must be printed"
    assert args.func(_parser().parse_args(argv), _quiet()) == 0
    assert list((tmp_path / "runs").glob("ablate-length-*")) == folders, "the same command must reuse its folder"
    assert len(load_rows(folders[0] / RESULTS)) == 2 * 4, "rerun must resume, not duplicate"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["ablate", "length", "--values", "1,two"], "length takes"),
        (["ablate", "content", "--values", "F4_L4"], "gives 8 tokens"),
        (["ablate", "position", "--task", "ruler/nope"], "Unknown RULER task"),
        (["ablate", "content", "--task", "helmet"], "Unknown task 'helmet'"),
        (["ablate", "length", "--budgets", "x"], "--budgets takes"),
    ],
)
def test_cli_rejects_bad_input_before_loading_the_model(argv, match, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(dapq.models, "load_model", no_model)
    args = _parser().parse_args(argv)
    with pytest.raises(DapqError, match=match):
        ablate_cli.cmd_ablate(args, _quiet())
    with pytest.raises(DapqError, match="Unknown ablation"):
        ablate_cli.cmd_ablate(argparse.Namespace(kind="speed"), _quiet())


def test_outputs_from_rows_alone(tmp_path):
    rows = [
        _row(label, 128, score, f"s{i}", **cfg)
        for i in range(2)
        for label, score, cfg in [
            ("dapq[part1]", 10.0 * i, {"insert_part": 1}),
            ("dapq[+0]", 80.0, {"position_offset": 0}),
            ("dapq[+64]", 60.0 + i, {"position_offset": 64}),
        ]
    ] + [_row("SnapKV", 128, 70.0, "s0", "snapkv"), _row("FullKV", None, 90.0, "s0", "full")]
    summary = ablate_report.write_outputs(rows, "position", tmp_path)
    groups = {v["label"]: v["group"] for v in summary["variants"]}
    assert groups == {
        "dapq[part1]": "inside the prompt",
        "dapq[+0]": "shifted after it",
        "dapq[+64]": "shifted after it",
        "SnapKV": "reference",
        "FullKV": "reference",
    }, groups
    assert [v["value"] for v in summary["variants"][:3]] == ["part1", 0, 64], summary["variants"]
    assert Path(tmp_path / "ablate-position.png").stat().st_size > 5000, "the position figure was not drawn"
    with pytest.raises(DapqError, match="No result rows"):
        ablate_report.write_outputs([], "position", tmp_path)
