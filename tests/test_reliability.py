"""Issue 12, API side: every bad input gives its one-line DapqError (or the right behaviour), and the prompt is the
chat template's own tokenization of the whole message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dapq import DapQ, DapqError, FullKV, SnapKV, answer_many, generate, get_method
from dapq.engine import compress
from dapq.methods.base import parse_param
from dapq.methods.laq import LAQ
from dapq.methods.streaming_llm import StreamingLLM
from dapq.prompts import build_prompt, split_encode
from helpers import TinyTokenizer, build_tiny, random_prompt, until_stop

TOK = TinyTokenizer()

BAD_API = [
    ("rerotate string", lambda: StreamingLLM(budget=16, rerotate="no"), "rerotate must be bool"),
    (
        "include_pseudo_keys string",
        lambda: DapQ(budget=16, include_pseudo_keys="no"),
        "include_pseudo_keys must be bool",
    ),
    ("budget 1.0", lambda: DapQ(budget=1.0), "pass an int (1) for a token count"),
    ("budget 2.0", lambda: SnapKV(budget=2.0), "pass an int (2) for a token count"),
    ("laq even kernel", lambda: LAQ(budget=64, kernel=6), "kernel must be an odd integer"),
    ("snapkv even kernel", lambda: SnapKV(budget=64, kernel=6), "kernel must be an odd integer"),
    ("fixed_text int", lambda: DapQ(budget=16, fixed_text=123), "fixed_text must be str"),
    ("n_pseudo bool", lambda: DapQ(budget=16, n_pseudo_tokens=True), "n_pseudo_tokens must be int"),
    ("seed str", lambda: DapQ(budget=16, seed="1"), "seed must be int"),
    ("bool text maybe", lambda: parse_param(StreamingLLM, "rerotate", "maybe"), "takes true/false, 1/0 or yes/no"),
    ("int text", lambda: parse_param(SnapKV, "window", "eight"), "snapkv.window takes int"),
    ("unknown param", lambda: parse_param(SnapKV, "windows", "8"), "has no parameter windows"),
]


@pytest.mark.parametrize("case", BAD_API, ids=[c[0] for c in BAD_API])
def test_bad_api_input_gives_a_one_line_error(case):
    _, call, message = case
    with pytest.raises(DapqError) as info:
        call()
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("yes", True), ("1", True), ("TRUE", True), ("false", False), ("no", False), ("0", False)],
)
def test_booleans_parse_strictly(text, value):
    assert parse_param(StreamingLLM, "rerotate", text) is value
    assert StreamingLLM(budget=16, rerotate=parse_param(StreamingLLM, "rerotate", text)).renumbers_positions is value


def test_param_values_are_typed_by_field():
    assert parse_param(SnapKV, "window", "8") == 8
    assert parse_param(SnapKV, "budget", "64") == 64 and isinstance(parse_param(SnapKV, "budget", "64"), int)
    assert parse_param(SnapKV, "budget", "0.1") == 0.1
    assert parse_param(DapQ, "insert_part", "none") is None
    assert parse_param(DapQ, "content", "RC_C") == "RC_C"


def test_a_ratio_budget_below_the_window_says_so():
    model = build_tiny("llama")
    with pytest.raises(DapqError, match="fewer than the 9 it needs"):
        compress(model, TOK, [random_prompt(40, 1)], SnapKV(budget=0.1, window=8))  # 4 tokens < window + 1
    compress(model, TOK, [random_prompt(40, 1)], SnapKV(budget=0.5, window=8))  # 20 tokens: fine


@pytest.mark.parametrize(
    "call",
    [
        lambda m: generate(m, TOK, None, "q?"),
        lambda m: generate(m, TOK, "ctx", None),
        lambda m: generate(m, TOK, ["a", 3], "q?"),
        lambda m: generate(m, TOK, "some context", "   "),
        lambda m: generate(m, TOK, "   ", "q?", mode="question_agnostic"),
        lambda m: answer_many(m, TOK, "", ["q?"]),
        lambda m: answer_many(m, TOK, "ctx", [""]),
    ],
    ids=[
        "context None",
        "question None",
        "context list with int",
        "empty question",
        "empty context qa",
        "am ctx",
        "am q",
    ],
)
def test_generate_refuses_bad_prompts(call):
    model = build_tiny("llama")
    with pytest.raises(DapqError) as info:
        call(model)
    assert "\n" not in str(info.value)


class _Offsets:
    """A fast-tokenizer stand-in whose pre-tokenizer merges "\\n\\n" into one token only at the end of a text."""

    is_fast = True

    def _tokens(self, text: str) -> list[tuple[int, int]]:
        spans, i = [], 0
        while i < len(text):
            if text.startswith("\n\n", i) and i + 2 == len(text):
                spans.append((i, i + 2))
                i += 2
            else:
                spans.append((i, i + 1))
                i += 1
        return spans

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = self._tokens(text)
        return {"input_ids": [hash(text[a:b]) % 1000 + (b - a) * 1000 for a, b in spans], "offset_mapping": spans}

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"]


def test_split_encode_is_the_whole_texts_tokenization():
    tok = _Offsets()
    head, tail = "context.\n\n", "Question?"
    ctx, q = split_encode(tok, head, tail, add_special_tokens=False)
    assert ctx + q == tok.encode(head + tail), "the parts must concatenate to the whole text's ids"
    assert tok.encode(head) != ctx, "this tokenizer merges a trailing blank line: separate calls would differ"
    assert len(ctx) == len(head), "the two newlines stay in the context part"


def test_build_prompt_parts_concatenate_to_one_encoding():
    ctx, q = build_prompt(TOK, "abc def", "what?", chat_template=False)
    assert ctx + q == TOK.encode("abc def\n\nwhat?")


@pytest.mark.bundled
def test_fullkv_equals_model_generate_on_the_chat_templates_own_ids(bundled):
    import torch

    model, tok = bundled
    context = "Alice keeps a small garden behind the library. The roses there bloom in late May."
    question = "When do the roses bloom?"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": f"{context}\n\n{question}"}], tokenize=True, add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ctx, q = build_prompt(tok, context, question)
    assert ctx + q == ids, "build_prompt must be the chat template's own tokenization"
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    out = generate(model, tok, context, question, FullKV(), max_new_tokens=16)
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    ref_cut = until_stop(ref, stops)
    assert out.token_ids[0] == ref_cut, f"{tok.decode(out.token_ids[0])!r} != {tok.decode(ref_cut)!r}"
    assert get_method("full").compresses is False


# ---------------------------------------------------------------------------------------------------- command line
@pytest.fixture
def no_model(monkeypatch):
    import dapq.models

    def fail(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(dapq.models, "load_model", fail)


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    binary = tmp / "bin.dat"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp / "empty.txt"
    empty.write_text("  \n")
    afile = tmp / "afile"
    afile.write_text("x")
    ctx = tmp / "ctx.txt"
    ctx.write_text("some context")
    return [
        (["generate", "-q", "x", "--context-file", str(binary)], "is not UTF-8 text"),
        (["generate", "-q", "x", "--context-file", str(empty)], "is empty"),
        (["generate", "-q", "x", "--context-file", str(empty), "--mode", "question_agnostic"], "is empty"),
        (["generate", "-q", "x", "--mode", "question_agnostic"], "question_agnostic mode compresses the context"),
        (["generate", "-q", " ", "--context-file", str(ctx)], "--question is empty"),
        (["generate", "-q", "x", "--context", "y", "--max-new-tokens", "0"], "--max-new-tokens must be an integer"),
        (["generate", "-q", "x", "--context", "y", "--device", "cuda"], "no CUDA device"),
        (["generate", "-q", "x", "--context", "y", "--device", "toaster"], "is not a device"),
        (["generate", "-q", "x", "--context", "y", "--attn", "foo"], "--attn 'foo' is not an attention backend"),
        (["generate", "-q", "x", "--context", "y", "--dtype", "fp8"], "Unknown dtype 'fp8'"),
        (["generate", "-q", "x", "--context", "y", "--model", str(tmp / "no-such-model")], "no such file or folder"),
        (["generate", "-q", "x", "--context", "y", "--budget", "1.0"], r"pass an int \(1\) for a token count"),
        (
            ["generate", "-q", "x", "--context", "y", "--method", "streamingllm", "--param", "rerotate=maybe"],
            "takes true/false, 1/0 or yes/no",
        ),
        (
            ["generate", "-q", "x", "--context", "y", "--method", "snapkv", "--param", "budget=64", "--budget", "64"],
            "both set the budget",
        ),
        (["generate", "-q", "x", "--context", "y", "--method", "laq", "--param", "kernel=6"], "kernel must be an odd"),
        (["eval", "niah", "--out", str(afile)], "is an existing file"),
        (["eval", "niah", "--samples", "0"], "--samples must be an integer"),
        (["eval", "niah", "--lengths", "0"], "--lengths needs positive integers"),
        (["eval", "niah", "--device", "cuda:0"], "no CUDA device"),
        (["eval", "niah", "--param", "dapq.budget=64"], "budgets come from --budgets"),
        (["eval", "niah", "--param", "dapq.include_pseudo_keys=no", "--budgets", "2.0"], r"pass an int \(2\)"),
        (["eval", "longbench", "--subsets", "qasperr"], "Unknown LongBench subset 'qasperr'"),
        (["ablate", "length", "--out", str(afile)], "is an existing file"),
    ]


def test_every_bad_command_line_is_a_one_line_error_on_stderr_before_the_model_load(
    no_model, capsys, tmp_path, monkeypatch
):
    from dapq.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, match in _cases(tmp_path):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert not captured.out, f"{argv}: stdout must stay clean: {captured.out!r}"
        err = captured.err
        assert err.startswith("error:") and err.count("\n") == 1, f"{argv}: {err!r}"
        assert re.search(match, err), f"{argv}: {err!r}"


def test_a_long_error_is_not_wrapped(capsys, monkeypatch):
    from dapq.cli import main

    monkeypatch.setenv("COLUMNS", "40")
    assert main(["generate", "-q", "x", "--context", "y", "--method", "nope" * 30]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) > 120


def test_report_errors_name_the_file_and_line(tmp_path, capsys):
    from dapq.cli import main

    (tmp_path / "results.jsonl").write_text('{"sample_id": "a"}\n')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl:1: row has no valid 'task'" in err and err.count("\n") == 1


@pytest.mark.bundled
def test_generate_json_is_pure_json_on_stdout(tmp_path):
    import json as _json
    import subprocess
    import sys

    ctx = tmp_path / "c.txt"
    ctx.write_text("The meeting is on Tuesday at noon.")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dapq.cli",
            "generate",
            "--method",
            "full",
            "--context-file",
            str(ctx),
            "-q",
            "When is the meeting?",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    data = _json.loads(done.stdout)  # nothing but the JSON
    assert set(data) == {"text", "stats"}
