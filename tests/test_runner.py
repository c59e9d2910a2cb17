"""The one-prefill evaluation path equals the serving path, and the runner resumes after kill -9 without losing or
duplicating rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dapq import get_method, list_methods
from dapq.engine import compress, derive, generate, greedy_decode, merge, record
from dapq.harness.runner import MethodSpec, decode_batches, run
from dapq.methods.protocols import pseudo_length
from dapq.runs import RunConfig, load_rows
from dapq.tasks.sample import Sample
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt, toy_samples

TOK = TinyTokenizer()
TESTS = Path(__file__).parent


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_one_prefill_equals_serving_path_for_every_method(arch, layout):
    model = build_tiny(arch)
    prompts = [random_prompt(40, 1), random_prompt(31, 2)]
    rec = record(model, TOK, prompts, suffix=get_method("dapq", budget=12, **METHOD_PARAMS["dapq"]))
    for name in sorted(list_methods()):
        method = get_method(name, budget=12, layout=layout, **METHOD_PARAMS.get(name, {}))
        served = compress(model, TOK, prompts, method)
        own = pseudo_length(method) and name != "dapq"  # another suffix (SpecKV's draft): its own recording
        derived = derive(record(model, TOK, prompts, suffix=method) if own else rec, method)
        for i, (a, b) in enumerate(zip(served.cache.layers, derived.cache.layers)):
            assert a.keys.shape == b.keys.shape, f"{name} layer {i}: {tuple(a.keys.shape)} vs {tuple(b.keys.shape)}"
            diff = float((a.keys - b.keys).abs().max())
            assert diff < 1e-5, f"{name} layer {i}: kept keys differ by {diff}"
            assert torch.equal(served.state.tracks[i].pos, derived.state.tracks[i].pos), f"{name} layer {i}: kept set"
        assert torch.equal(served.next_pos, derived.next_pos), f"{name}: next positions"
        want = greedy_decode(served, served.first_logits, 6, set())
        got = greedy_decode(derived, derived.first_logits, 6, set())
        assert got == want, f"{name}: one-prefill tokens {got} != serving tokens {want}"


def test_a_dapq_variant_with_another_suffix_is_refused():
    model = build_tiny("llama")
    rec = record(model, TOK, [random_prompt(40, 1)], suffix=get_method("dapq", budget=12, n_pseudo_tokens=8))
    with pytest.raises(ValueError, match="own pseudo suffix"):
        derive(rec, get_method("dapq", budget=12, n_pseudo_tokens=8, content="RC_C"))


def _samples(n: int) -> list[Sample]:
    return toy_samples(n)


SPECS = [MethodSpec.of("full"), MethodSpec.of("snapkv", window=4), MethodSpec.of("dapq", n_pseudo_tokens=8)]


@pytest.mark.parametrize("mode", ["query_aware", "question_agnostic"])
def test_runner_predictions_equal_generate(tmp_path, mode):
    model = build_tiny("llama")
    samples = _samples(2)
    path = run(model, TOK, samples, SPECS, [16, 24], tmp_path, config=RunConfig(model="tiny", mode=mode))
    rows = load_rows(path)
    assert len(rows) == len(samples) * (1 + 2 + 2)
    # caches of 16, 24 and ~65 tokens are within the 8x spread: one padded batch of all five rows
    assert {r["decode_batch"] for r in rows} == {5}, "every method should decode in one padded batch"
    for row in rows:
        sample = samples[int(row["sample_id"][1:])]
        method = get_method(
            row["method"], budget=row["budget"], **dict(SPECS[["full", "snapkv", "dapq"].index(row["method"])].params)
        )
        out = generate(model, TOK, sample.context, sample.question, method, mode=mode, max_new_tokens=4)
        assert row["prediction"] == out.text, (
            f"{row['method_key']} B={row['budget']}: {row['prediction']!r} != {out.text!r}"
        )
        assert 0.0 <= row["score"] <= 100.0
        assert row["model"] == "tiny" and row["mode"] == mode and "versions" in row


def test_runner_rows_carry_the_extra_passes_and_equal_generate(tmp_path, monkeypatch):
    """KVzip's context pass and SpecKV's draft run once per sample (every budget served from them), their costs are
    in every row, and the predictions equal the serving path's."""
    from dapq.engine import context_pass, draft

    calls = {"pass": 0, "draft": 0}
    run_chunks, write = context_pass.run_chunks, draft.write

    def counted_chunks(*a, **k):
        calls["pass"] += 1
        return run_chunks(*a, **k)

    def counted_write(*a, **k):
        calls["draft"] += 1
        return write(*a, **k)

    monkeypatch.setattr(context_pass, "run_chunks", counted_chunks)
    monkeypatch.setattr(draft, "write", counted_write)
    model = build_tiny("llama")
    samples = _samples(2)
    specs = [MethodSpec.of("kvzip", chunk_size=32), MethodSpec.of("speckv", n_draft=5)]
    path = run(model, TOK, samples, specs, [16, 24], tmp_path, config=RunConfig(model="tiny"))
    assert calls == {"pass": 2, "draft": 2}, f"one context pass and one draft per sample, got {calls}"
    rows = load_rows(path)
    assert len(rows) == 2 * 2 * 2
    monkeypatch.undo()
    for row in rows:
        key = "pass_s" if row["method"] == "kvzip" else "draft_s"
        assert row[key] > 0, f"{row['method']}: {key} missing from the row"
        same = [r for r in rows if r["sample_id"] == row["sample_id"] and r["method"] == row["method"]]
        assert len({r[key] for r in same}) == 1, "both budgets report the one pass / draft of their sample"
        sample = samples[int(row["sample_id"][1:])]
        method = get_method(row["method"], budget=row["budget"], **dict(specs[row["method"] == "speckv"].params))
        out = generate(model, TOK, sample.context, sample.question, method, max_new_tokens=4)
        assert row["prediction"] == out.text


def test_runner_skips_done_rows_and_cuts_a_torn_line(tmp_path):
    model = build_tiny("llama")
    path = run(model, TOK, _samples(2), SPECS[:2], [16], tmp_path, config=RunConfig(model="tiny"))
    before = path.read_text()
    with open(path, "a") as f:
        f.write('{"sample_id": "s9", "meth')  # a row torn by a kill mid-write
    run(model, TOK, _samples(2), SPECS[:2], [16], tmp_path, config=RunConfig(model="tiny"))
    assert path.read_text() == before, "a finished run must not write again, and the torn line must be cut"


def test_resumed_run_counts_only_the_rows_it_writes(tmp_path):
    """A resumed sweep names the rows it found in one line; its bar (and so its rate and time left) counts only the
    rows it writes now: rows found on disk counted as progress made a two-hour resume say "2 min left"."""
    import io

    from rich.console import Console

    model = build_tiny("llama")
    specs, budgets = SPECS[:2], [16]  # 2 rows per sample
    run(model, TOK, _samples(2), specs, budgets, tmp_path, config=RunConfig(model="tiny"))
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    run(model, TOK, _samples(3), specs, budgets, tmp_path, config=RunConfig(model="tiny"), console=console)
    text = buf.getvalue()
    assert "resuming: 4 of 6 rows are already in" in text, text
    ends = [line for line in text.splitlines() if line.startswith("toy")]
    assert ends and ends[-1].split(" (")[0].endswith(": 2/2"), f"the bar counts the 2 new rows only: {text}"
    assert len(load_rows(tmp_path / "results.jsonl")) == 6


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_runner as t
    from dapq.runs import RunConfig
    from dapq.harness.runner import run
    from helpers import build_tiny
    run(build_tiny("llama"), t.TOK, t._samples(12), t.SPECS, [16, 24], {out!r}, config=RunConfig(model="tiny"))
    """
)


def test_kill_minus_nine_then_resume(tmp_path):
    out = tmp_path / "run"
    script = SCRIPT.format(tests=str(TESTS), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = load_rows(results)
    assert 7 <= len(partial) < 12 * 5, f"killed with {len(partial)} rows"
    model = build_tiny("llama")
    run(model, TOK, _samples(12), SPECS, [16, 24], out, config=RunConfig(model="tiny"))
    rows = load_rows(results)
    keys = [(r["sample_id"], r["method_key"], r["budget"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated rows after resume"
    want = {(f"s{i}", s.key, b) for i in range(12) for s in SPECS for b in ([None] if s.name == "full" else [16, 24])}
    assert set(keys) == want, f"missing rows: {sorted(want - set(keys))[:5]}"
    assert all(json.loads(line) for line in results.read_text().splitlines())


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_padded_merge_decodes_like_each_cache_alone(layout):
    """Caches of different lengths (budgets, PyramidKV's per-layer budgets) merged with invalid padding decode to
    exactly the tokens each decodes alone."""
    model = build_tiny("llama")
    prompt = random_prompt(70, 3)
    methods = [
        get_method("snapkv", budget=12, window=4, layout=layout),
        get_method("pyramidkv", budget=20, window=4, layout=layout),
        get_method("h2o", budget=40, recent=4, layout=layout),
        get_method("full", layout=layout),
    ]
    rec = record(model, TOK, [prompt])
    alone = [greedy_decode(cc, cc.first_logits, 6, set())[0] for cc in (derive(rec, m) for m in methods)]
    merged = merge([derive(rec, m) for m in methods])
    lengths = {layer.keys.shape[2] for layer in merged.cache.layers}
    assert lengths == {70}, f"every merged layer should be padded to the longest cache (70); got {lengths}"
    together = greedy_decode(merged, merged.first_logits, 6, set())
    assert together == alone, f"padded batch decoded {together}, alone {alone}"


def test_decode_batches_group_by_layout_length_and_rows():
    model = build_tiny("llama")
    rec = record(model, TOK, [random_prompt(200, 4)])
    caches = [derive(rec, get_method("snapkv", budget=b, window=4)) for b in (10, 20, 40, 80, 160)]
    caches += [
        derive(rec, get_method("full")),
        derive(rec, get_method("snapkv", budget=20, window=4, layout="query_head")),
    ]
    batches = decode_batches(caches, max_rows=16)
    assert sorted(n for b in batches for n in b) == list(range(len(caches))), f"every cache once: {batches}"
    assert [6] in batches, f"the query_head cache decodes apart from kv_head ones: {batches}"
    assert [0, 1, 2, 3] in batches and [4, 5] in batches, f"lengths 10..80 together, 160 with full (200): {batches}"
    small = decode_batches(caches[:5], max_rows=2)
    assert all(len(b) <= 2 for b in small) and len(small) == 3, f"max_rows=2 splits into 3 batches: {small}"


def test_scores_shared_across_budgets_select_like_the_serving_path():
    """The recording memoises budget-independent scores; every budget must still select what `compress` selects."""
    model = build_tiny("llama")
    prompts = [random_prompt(50, 5)]
    rec = record(model, TOK, prompts, suffix=get_method("dapq", budget=8, **METHOD_PARAMS["dapq"]))
    for name in ["snapkv", "pyramidkv", "h2o", "dapq"]:
        for budget in (8, 16, 30):
            method = get_method(name, budget=budget, **METHOD_PARAMS.get(name, {}))
            served, derived = compress(model, TOK, prompts, method), derive(rec, method)
            for i in range(len(served.cache.layers)):
                assert torch.equal(served.state.tracks[i].pos, derived.state.tracks[i].pos), (
                    f"{name} budget {budget} layer {i}: kept set differs from the serving path"
                )
    assert any(rec.memo[0]), "scores should have been memoised in the recording"


def test_compacting_finished_rows_does_not_change_the_tokens():
    model = build_tiny("llama")
    prompts = [random_prompt(30 + 3 * i, 10 + i) for i in range(4)]
    method = get_method("snapkv", budget=16, window=4)
    cc = compress(model, TOK, prompts, method)
    free = greedy_decode(cc, cc.first_logits, 10, set())
    stops = {free[0][2], free[2][1]}  # rows finish at different steps
    cc_a, cc_b = compress(model, TOK, prompts, method), compress(model, TOK, prompts, method)
    plain = greedy_decode(cc_a, cc_a.first_logits, 10, stops)
    compacted = greedy_decode(cc_b, cc_b.first_logits, 10, stops, compact=True)
    assert compacted == plain, f"compacted {compacted} != plain {plain}"
    assert cc_b.cache.layers[0].keys.shape[0] < len(prompts), "finished rows should have been dropped from the cache"


def test_progress_prints_plain_lines_when_no_terminal_reads_it():
    """A sweep or training run logged to a file (`nohup dapq eval ... > log`) shows its progress as plain lines:
    one every `every` seconds and one when a task ends, where rich alone prints nothing until the end. A terminal
    gets the live bar and no such lines."""
    import io

    from rich.console import Console

    from dapq.harness.runner import sweep_progress

    def lines(terminal: bool, every: float, window: float = 30.0) -> list[str]:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=terminal, width=100)
        with sweep_progress(console, every=every) as bar:
            bar.speed_estimate_period = window  # rich's rate: the rows of the last `window` seconds
            task = bar.add_task("rows", total=6)
            for _ in range(6):
                time.sleep(0.02)
                bar.advance(task)
        return [line for line in buf.getvalue().splitlines() if line.startswith("rows:")]

    logged = lines(False, every=0.05)
    assert 2 <= len(logged) <= 5 and logged[-1].startswith("rows: 6/6 (") and "left" in logged[0]
    sparse = lines(False, every=0.05, window=1e-6)  # rows further apart than rich's window: the mean rate's ETA
    assert "left" in sparse[0] and all("min left" in line for line in sparse[:-1])
    once = lines(False, every=3600)  # a short task: only its end
    assert len(once) == 1 and once[0].startswith("rows: 6/6 (")
    assert lines(True, every=0.0) == []
