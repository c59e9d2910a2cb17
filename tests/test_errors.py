"""Bad input gives a DapqError whose message says what is wrong (each test checks a key phrase)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

from dapq import DapQ, DapqError, FullKV, SnapKV, answer_many, generate, get_method, list_methods
from dapq.engine import check_model, compress
from helpers import MAX_POS, METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()
PARAMS = METHOD_PARAMS


def raises(phrase: str):
    return pytest.raises(DapqError, match=re.escape(phrase))


def test_dapq_error_is_a_value_error():
    assert issubclass(DapqError, ValueError)


# ---------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget", [0, -1, -128])
@pytest.mark.parametrize("name", sorted(list_methods()))
def test_budget_not_positive(name, budget):
    with raises("budget must be >= 1 token per head"):
        get_method(name, budget=budget, **PARAMS.get(name, {}))


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, 2.5])
def test_budget_ratio_out_of_range(budget):
    with raises("budget as a ratio must be in (0, 1)"):
        DapQ(budget=budget)


@pytest.mark.parametrize("budget", ["64", True, [64]])
def test_budget_wrong_type(budget):
    with raises("budget must be a number of tokens"):
        SnapKV(budget=budget)


@pytest.mark.parametrize("budget", [1.0, 2.0, 64.0])
def test_whole_float_budget_is_refused_with_a_hint(budget):
    # issue 12: 1.0 silently meant 1 token while 1.5 was rejected; an integer-valued float is now an error
    with raises(f"pass an int ({int(budget)}) for a token count, or a ratio in (0, 1)"):
        DapQ(budget=budget)
    assert DapQ(budget=0.5).token_budget(101) == 51


# ---------------------------------------------------------------------------------------------------- DapQ knobs
@pytest.mark.parametrize("n", [0, -4])
def test_n_pseudo_not_positive(n):
    with raises("n_pseudo_tokens (N) must be an integer >= 1"):
        DapQ(budget=64, n_pseudo_tokens=n)


@pytest.mark.parametrize("content", ["bogus", "F4L28", "first_last", ""])
def test_bad_content_string(content):
    with raises("content must be F<m>_L<n> (e.g. F4_L28) or one of auto, RS_C, RC_C, Fix_C, random_vocab"):
        DapQ(budget=64, content=content)


def test_content_length_must_match_n():
    with raises("content F4_L4 gives 8 tokens but n_pseudo_tokens is 32"):
        DapQ(budget=64, content="F4_L4")


def test_fix_c_needs_tokenizer():
    with raises("content='Fix_C' needs the tokenizer"):
        DapQ(budget=64, content="Fix_C").pseudo_ids([5, 6, 7], 128, None)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"insert_part": 4}, "insert_part must be None, 1, 2 or 3"),
        ({"insert_part": 2, "position_offset": 32}, "set only one of them"),
        ({"position_offset": -1}, "position_offset must be an integer >= 0"),
        ({"keep_recent": 64}, "budget (64) must be larger than keep_recent"),
        ({"keep_recent": -1}, "keep_recent must be an integer >= 0"),
        ({"layout": "per_head"}, "layout must be one of kv_head, query_head"),
        ({"gqa": "sum"}, "gqa must be one of mean, max"),
        ({"pooling": "median"}, "pooling must be one of none, max, avg"),
        ({"kernel": 4}, "kernel must be an odd integer >= 1"),
        ({"kernel": 0}, "kernel must be an odd integer >= 1"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_dapq_knobs(kwargs, phrase):
    with raises(phrase):
        DapQ(budget=64, **kwargs)


def test_insert_part_needs_a_long_enough_prompt():
    with raises("insert_part=2 needs each third of the prompt (10 tokens) to hold N=32 pseudo positions"):
        compress(build_tiny("llama"), TOK, [random_prompt(30, 0)], DapQ(budget=8, insert_part=2))


def test_snapkv_window_must_fit_the_budget():
    with raises("budget (32) must be larger than window"):
        SnapKV(budget=32)  # default window 32
    with raises("window must be an integer >= 1"):
        SnapKV(budget=32, window=0)


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_method_lists_valid_names():
    with pytest.raises(DapqError) as info:
        get_method("h2oo", budget=64)
    msg = str(info.value)
    assert "Unknown method 'h2oo'" in msg
    for name in list_methods():
        assert name in msg, f"{name!r} missing from: {msg}"


def test_unknown_method_through_generate():
    with raises("Unknown method 'nope'. Valid methods:"):
        generate(build_tiny("llama"), TOK, "some context", "a question?", "nope")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(DapqError) as info:
        get_method("dapq", budget=64, n_pseudo=8, window=4)
    msg = str(info.value)
    assert "Method 'dapq' has no parameter(s) n_pseudo, window" in msg
    assert "n_pseudo_tokens" in msg and "budget" in msg


def test_method_of_the_wrong_type():
    with raises("method must be a dapq Method or a method name; got int"):
        generate(build_tiny("llama"), TOK, "some context", "a question?", 42)


# ---------------------------------------------------------------------------------------------------- models
def test_model_without_rotary_embeddings():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).eval()
    with raises("GPT2LMHeadModel has no rotary position embeddings"):
        check_model(model)
    with raises("use a RoPE model"):
        compress(model, TOK, [random_prompt(10, 0)], FullKV())


def test_model_without_attention_interface():
    torch.manual_seed(0)
    cfg = GPTJConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=128, n_positions=64)
    model = GPTJForCausalLM(cfg).eval()  # rotary, but its attention is hard-wired
    with raises("GPTJForCausalLM does not route attention through transformers' AttentionInterface"):
        check_model(model)
    with raises("AttentionInterface"):
        generate(model, TOK, "some context", "a question?", DapQ(budget=8, n_pseudo_tokens=4), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------- prompts
def test_empty_prompt_row():
    model = build_tiny("llama")
    with raises("Empty prompt: every row needs at least one token"):
        compress(model, TOK, [random_prompt(10, 0), []], FullKV())
    with raises("Empty prompt"):
        compress(model, TOK, [], FullKV())


def test_empty_context_and_question():
    with raises("The prompt is empty"):
        generate(build_tiny("llama"), TOK, "  ", "", FullKV())


def test_answer_many_needs_questions():
    with raises("answer_many needs at least one question"):
        answer_many(build_tiny("llama"), TOK, "some context", [], FullKV())


def test_contexts_and_questions_must_pair_up():
    with raises("2 contexts but 3 questions"):
        generate(build_tiny("llama"), TOK, ["a", "b"], ["q1", "q2", "q3"], FullKV())


def test_chat_template_requested_but_missing():
    with raises("This tokenizer has no chat template"):
        generate(build_tiny("llama"), TOK, "context", "question?", FullKV(), chat_template=True)


def test_context_longer_than_the_model():
    model = build_tiny("llama")
    with raises(f"beyond the model's maximum of {MAX_POS} positions"):
        compress(model, TOK, [random_prompt(MAX_POS + 10, 0)], FullKV())
    with raises("+ 32 pseudo tokens) reaches position"):  # the prompt fits, its pseudo suffix does not
        compress(model, TOK, [random_prompt(MAX_POS - 10, 0)], DapQ(budget=64))
    context, question = "x" * (MAX_POS - 40), "q?"
    needed = len(TOK.encode(context + "\n\n")) + len(question) + 32 + 64  # prompt + DapQ's N + max_new_tokens
    with raises(f"need {needed} positions but the model supports {MAX_POS}"):
        generate(model, TOK, context, question, DapQ(budget=64), max_new_tokens=64, chat_template=False)


# ---------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("mode", ["query-aware", "agnostic", ""])
def test_bad_mode(mode):
    with raises("mode must be one of query_aware, question_agnostic"):
        generate(build_tiny("llama"), TOK, "some context", "a question?", FullKV(), mode=mode)


@pytest.mark.parametrize("n", [0, -1, 1.5, "8"])
def test_bad_max_new_tokens(n):
    with raises("max_new_tokens must be an integer >= 1"):
        generate(build_tiny("llama"), TOK, "some context", "a question?", FullKV(), max_new_tokens=n)
