"""Serving: prefill -> compress -> greedy decode, with explicit position ids, batches and two compression modes.

    from dapq import load_model, DapQ, generate
    model, tok = load_model()
    out = generate(model, tok, context, question, method=DapQ(budget=128))
    print(out.text, out.stats)

Query-aware mode (the paper): the whole prompt (context, question, chat template) is prefilled and compressed.
Question-agnostic mode: only the context part is compressed; the question part is appended after the compressed
cache at the positions following the context; `answer_many` answers several questions against one compressed
context, restoring the cache between them. Batches are left-padded: each row has its own prompt length, pseudo
positions and kept set, and pad keys are never kept or attended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import DapqError
from ..hf.cache import restore, snapshot
from ..methods.base import Method, get_method
from ..methods.full import FullKV
from ..methods.protocols import pseudo_length
from ..prompts import MODES, build_prompt, stop_token_ids
from .decode import Sampling, append, greedy_decode
from .decode_time import DecodeCompression
from .model_info import model_device, model_info, sync_device
from .prefill import compress


@dataclass
class GenerationOutput:
    """`text` (str for a single prompt, list for a batch), `token_ids` per row, and `stats`."""

    text: str | list[str]
    token_ids: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_method(method: Method | str | None, **params: Any) -> Method:
    """A Method from an instance, a registered name (with `params`) or None (FullKV)."""
    if method is None:
        return FullKV()
    if isinstance(method, str):
        return get_method(method, **params)
    if not isinstance(method, Method):
        raise DapqError(f"method must be a dapq Method or a method name; got {type(method).__name__}")
    return method


def method_for(model: Any, method: Method | str | None, **params: Any) -> Method:
    """`resolve_method`'s method for `model`: with the parameters it takes from the model filled in
    (`Method.for_model`, e.g. `learned` without a file: the queries dapq ships for this model)."""
    return resolve_method(method, **params).for_model(model.config)


def _as_rows(context: str | list[str], question: str | list[str]) -> tuple[list[str], list[str], bool]:
    def strings(value: Any, what: str) -> list[str] | None:
        if isinstance(value, str):
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise DapqError(f"{what} must be a string or a list of strings; got {type(value).__name__}.")
        return list(value)

    listed = strings(context, "context")
    single = listed is None
    contexts = [context] if listed is None else listed
    q_list = strings(question, "question")
    questions = [question] * len(contexts) if q_list is None else q_list
    if len(questions) != len(contexts):
        raise DapqError(f"{len(contexts)} contexts but {len(questions)} questions: pass one question per context.")
    if not contexts:
        raise DapqError("No prompt given.")
    return contexts, questions, single


def check_questions(questions: list[str]) -> None:
    """An empty question makes the model answer nothing in particular: refuse it."""
    for q in questions:
        if not q.strip():
            raise DapqError("The question is empty: pass the question to answer about the context.")


def generate(
    model: Any,
    tokenizer: Any,
    context: str | list[str],
    question: str | list[str],
    method: Method | str | None = None,
    *,
    mode: str = "query_aware",
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    answer_prefix: str = "",
    stop: list[str] | None = None,
    sampling: Sampling | None = None,
    streamer: Any = None,
    decode_compression: DecodeCompression | None = None,
) -> GenerationOutput:
    """Answer `question` about `context` with the KV cache compressed by `method` (default: FullKV).

    A list of contexts (and one question each) runs as a left-padded batch. `mode` is "query_aware" (compress the
    whole prompt, as in the paper) or "question_agnostic" (compress the context only, then append the question).
    Greedy unless `sampling` (`dapq.Sampling(temperature, top_k, top_p, seed)`) is given; `streamer` (e.g.
    transformers' `TextStreamer(tok)`) receives the new tokens as they come. `decode_compression`
    (`dapq.DecodeCompression(interval, window)`) keeps the cache within the method's budget while generating.
    Returns text, token ids and stats (prompt length, kept tokens per layer, KV bytes before/after, timings).
    """
    method = method_for(model, method)
    if mode not in MODES:
        raise DapqError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DapqError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    contexts, questions, single = _as_rows(context, question)
    parts = [
        build_prompt(tokenizer, c, q, chat_template=chat_template, answer_prefix=answer_prefix)
        for c, q in zip(contexts, questions)
    ]
    check_questions(questions)
    _check_length(model, max(len(c) + len(q) for c, q in parts) + pseudo_length(method) + max_new_tokens)
    if mode == "query_aware":
        cc = compress(model, tokenizer, [c + q for c, q in parts], method)
        logits = cc.first_logits
    else:
        if any(not c for c, _ in parts) or any(not c.strip() for c in contexts):
            raise DapqError("question_agnostic mode needs a non-empty context to compress.")
        cc = compress(model, tokenizer, [c for c, _ in parts], method)
        if decode_compression is not None:  # the question's queries re-score the cache before decoding starts
            cc.state.start_capture()
        logits = append(cc, [q for _, q in parts], int(tokenizer.pad_token_id or 0))
    start = time.perf_counter()
    stops = stop_token_ids(tokenizer, stop)
    report: dict[str, Any] = {}
    tokens = greedy_decode(
        cc,
        logits,
        max_new_tokens,
        stops,
        compact=True,
        sampling=sampling,
        streamer=streamer,
        decode_compression=decode_compression,
        report=report,
    )
    sync_device(model_device(model))
    stats = dict(cc.stats, mode=mode, decode_s=time.perf_counter() - start, new_tokens=[len(t) for t in tokens])
    stats.update(report)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationOutput(text=texts[0] if single else texts, token_ids=tokens, stats=stats)


def answer_many(
    model: Any,
    tokenizer: Any,
    context: str,
    questions: list[str],
    method: Method | str | None = None,
    *,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    answer_prefix: str = "",
    stop: list[str] | None = None,
    sampling: Sampling | None = None,
) -> list[GenerationOutput]:
    """Question-agnostic serving: compress `context` once, answer every question against it.

    Each question is appended after the compressed context (positions L, L+1, ...), answered greedily (or with
    `sampling`: a seeded one starts from its seed for each question, so each answer is reproducible alone), and the
    cache is restored to its compressed state before the next question.
    """
    method = method_for(model, method)
    if not questions:
        raise DapqError("answer_many needs at least one question.")
    if not isinstance(context, str) or not isinstance(questions, (list, tuple)):
        raise DapqError("answer_many takes one context string and a list of question strings.")
    parts = [
        build_prompt(tokenizer, context, q, chat_template=chat_template, answer_prefix=answer_prefix) for q in questions
    ]
    ctx_ids = parts[0][0]
    if not ctx_ids or not context.strip():
        raise DapqError("answer_many needs a non-empty context to compress.")
    check_questions(questions)
    _check_length(model, len(ctx_ids) + max(len(q) for _, q in parts) + pseudo_length(method) + max_new_tokens)
    cc = compress(model, tokenizer, [ctx_ids], method)
    snap = snapshot(cc.cache, cc.state.tracks)
    base_pos = cc.next_pos.clone()
    stops = stop_token_ids(tokenizer, stop)
    outputs = []
    for _, q_ids in parts:
        start = time.perf_counter()
        logits = append(cc, [q_ids], int(tokenizer.pad_token_id or 0))
        tokens = greedy_decode(cc, logits, max_new_tokens, stops, sampling=sampling)
        stats = dict(
            cc.stats, mode="question_agnostic", decode_s=time.perf_counter() - start, new_tokens=[len(tokens[0])]
        )
        outputs.append(
            GenerationOutput(text=tokenizer.decode(tokens[0], skip_special_tokens=True), token_ids=tokens, stats=stats)
        )
        restore(cc.cache, cc.state.tracks, snap)
        cc.next_pos = base_pos.clone()
    return outputs


def _check_length(model: Any, needed: int) -> None:
    max_pos = model_info(model).max_positions
    if max_pos is not None and needed > max_pos:
        raise DapqError(
            f"Prompt + pseudo tokens + max_new_tokens need {needed} positions but the model supports {max_pos}. "
            "Shorten the context, lower max_new_tokens, or use a model with a longer context."
        )
