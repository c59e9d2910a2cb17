"""The "dapq-text-generation" pipeline: kvpress's call shape, and the answers of answer_many / generate."""

from __future__ import annotations

import pytest

import dapq.pipeline  # noqa: F401  (registers the task)
from dapq import Sampling, answer_many, generate, get_method
from dapq.errors import DapqError
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny

TOK = TinyTokenizer()
CONTEXT = "the quick brown fox jumps over the lazy dog, then the dog sleeps in the sun " * 2
QUESTIONS = ["what jumps?", "who sleeps?"]


def make_pipe():
    from transformers import pipeline

    return pipeline("dapq-text-generation", model=build_tiny("llama"), tokenizer=TOK)


@pytest.mark.parametrize("method_name", ["full", "snapkv", "dapq", "laq", "kvzip", "learned", "speckv"])
def test_answers_equal_answer_many_and_generate(method_name):
    pipe = make_pipe()
    model = build_tiny("llama")
    params = {"budget": 24, **METHOD_PARAMS.get(method_name, {})}
    method = get_method(method_name, **params)
    got = pipe(CONTEXT, questions=QUESTIONS, method=method_name, method_params=params, max_new_tokens=6)
    want = [o.text for o in answer_many(model, TOK, CONTEXT, QUESTIONS, method, max_new_tokens=6)]
    assert got == {"answers": want}
    got = pipe(CONTEXT, question=QUESTIONS[0], method=method, mode="query_aware", max_new_tokens=6)
    assert got == {"answer": generate(model, TOK, CONTEXT, QUESTIONS[0], method, max_new_tokens=6).text}


def test_sampling_options_reach_the_engine():
    pipe = make_pipe()
    model = build_tiny("llama")
    got = pipe(CONTEXT, question=QUESTIONS[1], do_sample=True, temperature=0.8, top_p=0.9, seed=4, max_new_tokens=8)
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=4)
    want = answer_many(model, TOK, CONTEXT, [QUESTIONS[1]], max_new_tokens=8, sampling=sampling)[0].text
    assert got == {"answer": want}
    assert got != pipe(CONTEXT, question=QUESTIONS[1], max_new_tokens=8)  # the greedy answer differs here


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"question": "a", "questions": ["b"]}, "not both"),
        ({"questions": "what?"}, "list of strings"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"temperature": 0.5}, "do_sample=True"),
        ({"do_sample": True, "top_p": 0}, "top_p must be"),
        ({"press": object()}, "unknown options: press"),
        ({"method": "nope"}, "nope"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(DapqError, match=match):
        make_pipe()(CONTEXT, **kwargs)
