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
from dapq.bench.base import Sample
from dapq.bench.runner import MethodSpec, RunConfig, load_rows, run
from dapq.evalpath import derive, record
from dapq.generation import compress, generate, greedy_decode
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt

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
        derived = derive(rec, method)
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
    return [
        Sample(
            id=f"s{i}",
            task="toy",
            context="".join(chr(97 + (i * 7 + j) % 26) for j in range(60)),
            question=f"q{i}?",
            references=["a"],
            metric="string_match_all",
            max_new_tokens=4,
            metadata={"length": 60},
        )
        for i in range(n)
    ]


SPECS = [MethodSpec.of("full"), MethodSpec.of("snapkv", window=4), MethodSpec.of("dapq", n_pseudo_tokens=8)]


@pytest.mark.parametrize("mode", ["query_aware", "question_agnostic"])
def test_runner_predictions_equal_generate(tmp_path, mode):
    model = build_tiny("llama")
    samples = _samples(2)
    path = run(model, TOK, samples, SPECS, [16, 24], tmp_path, config=RunConfig(model="tiny", mode=mode))
    rows = load_rows(path)
    assert len(rows) == len(samples) * (1 + 2 + 2)
    assert max(r["decode_batch"] for r in rows) == 2, "snapkv and dapq at the same budget should decode as one batch"
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


def test_runner_skips_done_rows_and_cuts_a_torn_line(tmp_path):
    model = build_tiny("llama")
    path = run(model, TOK, _samples(2), SPECS[:2], [16], tmp_path, config=RunConfig(model="tiny"))
    before = path.read_text()
    with open(path, "a") as f:
        f.write('{"sample_id": "s9", "meth')  # a row torn by a kill mid-write
    run(model, TOK, _samples(2), SPECS[:2], [16], tmp_path, config=RunConfig(model="tiny"))
    assert path.read_text() == before, "a finished run must not write again, and the torn line must be cut"


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import test_runner as t
    from dapq.bench.runner import run, RunConfig
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
