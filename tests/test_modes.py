"""Compression modes and positions.

Question-agnostic mode: the compressed context cache is identical before and after answering, every answer of
`answer_many` equals answering that question alone, and with FullKV it gives the same tokens as query-aware mode.
Positions: DapQ's pseudo tokens sit at L .. L+N-1 (per row in a batch), inside the chosen third with `insert_part`,
and shifted by `position_offset`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dapq.engine.serve as gen
from dapq import DapQ, FullKV, answer_many, generate, get_method, list_methods
from dapq.engine import append, compress, greedy_decode
from dapq.hf.cache import restore, snapshot
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, max_diff, random_prompt

TOK = TinyTokenizer()
CONTEXT = (
    "Mara keeps bees on the hill behind the mill. The blue hive is the oldest; the red one swarmed in May. "
    "Her brother Tom sells the honey at the Tuesday market in town."
)
QUESTIONS = ["Who sells the honey?", "Which hive swarmed?", "Where are the bees?"]
# every registered method (both modes are served by the same engine), plus the reference query_head layout
METHODS = {
    name: (lambda name=name: get_method(name, budget=48, **METHOD_PARAMS.get(name, {}))) for name in list_methods()
}
METHODS["dapq-query_head"] = lambda: DapQ(budget=48, n_pseudo_tokens=8, layout="query_head")
METHODS["laq-query_head"] = lambda: get_method("laq", budget=48, layout="query_head", **METHOD_PARAMS["laq"])


def clone_state(cc) -> dict[str, Any]:
    return {
        "keys": [layer.keys.clone() for layer in cc.cache.layers],
        "values": [layer.values.clone() for layer in cc.cache.layers],
        "pos": [t.pos.clone() for t in cc.state.tracks],
        "valid": [t.valid.clone() for t in cc.state.tracks],
        "next_pos": cc.next_pos.clone(),
    }


def assert_same_state(before: dict[str, Any], cc) -> None:
    after = clone_state(cc)
    for name in before:
        if name == "next_pos":
            assert torch.equal(before[name], after[name]), f"next_pos {after[name]} != {before[name]}"
            continue
        for i, (a, b) in enumerate(zip(before[name], after[name])):
            assert a.shape == b.shape, f"layer {i} {name}: shape {tuple(b.shape)} after, {tuple(a.shape)} before"
            assert torch.equal(a, b), f"layer {i} {name} changed (max abs diff {max_diff(a, b)})"


# ---------------------------------------------------------------------------------------------------- restore
@pytest.mark.parametrize("method_key", list(METHODS))
def test_snapshot_restore_gives_identical_cache(method_key):
    model = build_tiny("llama")
    cc = compress(model, TOK, [random_prompt(60, 30)], METHODS[method_key]())
    before = clone_state(cc)
    snap = snapshot(cc.cache, cc.state.tracks)
    logits = append(cc, [random_prompt(9, 31)])
    greedy_decode(cc, logits, 5, set())
    assert cc.cache.layers[0].keys.shape[2] > before["keys"][0].shape[2]
    restore(cc.cache, cc.state.tracks, snap)
    cc.next_pos = before["next_pos"].clone()
    assert_same_state(before, cc)


@pytest.mark.parametrize("method_key", list(METHODS))
def test_answer_many_leaves_the_cache_unchanged(method_key, monkeypatch):
    model = build_tiny("llama")
    seen: list[tuple[Any, dict[str, Any]]] = []
    real_compress = gen.compress

    def recording_compress(*args, **kwargs):
        cc = real_compress(*args, **kwargs)
        seen.append((cc, clone_state(cc)))
        return cc

    monkeypatch.setattr(gen, "compress", recording_compress)
    outs = answer_many(model, TOK, CONTEXT, QUESTIONS, METHODS[method_key](), max_new_tokens=6)
    assert len(seen) == 1, "answer_many must compress the context once"
    cc, before = seen[0]
    assert_same_state(before, cc)
    assert len(outs) == len(QUESTIONS)
    assert all(o.stats["mode"] == "question_agnostic" for o in outs)


@pytest.mark.parametrize("method_key", list(METHODS))
def test_answer_many_equals_each_question_alone(method_key):
    model = build_tiny("qwen3")
    many = answer_many(model, TOK, CONTEXT, QUESTIONS, METHODS[method_key](), max_new_tokens=8)
    backwards = answer_many(model, TOK, CONTEXT, QUESTIONS[::-1], METHODS[method_key](), max_new_tokens=8)[::-1]
    for q, a, b in zip(QUESTIONS, many, backwards):
        alone = generate(model, TOK, CONTEXT, q, METHODS[method_key](), mode="question_agnostic", max_new_tokens=8)
        assert a.token_ids == alone.token_ids, f"{q!r}: answer_many {a.token_ids} != alone {alone.token_ids}"
        assert a.text == alone.text
        assert b.token_ids == a.token_ids, f"{q!r}: the answer depends on the questions answered before it"


# ---------------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2", "gemma3", "mistral_window"])
def test_question_agnostic_fullkv_equals_query_aware(family):
    model = build_tiny(family)
    ctx, q = random_prompt(50, 40), random_prompt(12, 41)
    full = compress(model, TOK, [ctx + q], FullKV())
    split = compress(model, TOK, [ctx], FullKV())
    logits = append(split, [q])
    diff = max_diff(logits[0], full.first_logits[0])
    assert diff < 1e-5, f"{family}: appended-question logits differ from the whole-prompt prefill by {diff:.2e}"
    assert split.next_pos.tolist() == [len(ctx) + len(q)]
    a = greedy_decode(full, full.first_logits, 8, set())
    b = greedy_decode(split, logits, 8, set())
    assert a == b, f"{family}: query-aware {a} != question-agnostic {b}"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_question_agnostic_fullkv_equals_query_aware_batch(family):
    """Left-padded batch: contexts and questions of different lengths (the appended chunk is left-padded too)."""
    model = build_tiny(family)
    ctxs = [random_prompt(50, 42), random_prompt(33, 43)]
    qs = [random_prompt(5, 44), random_prompt(11, 45)]
    full = compress(model, TOK, [c + q for c, q in zip(ctxs, qs)], FullKV())
    split = compress(model, TOK, ctxs, FullKV())
    logits = append(split, qs)
    for b in range(2):
        diff = max_diff(logits[b], full.first_logits[b])
        assert diff < 1e-4, f"{family} row {b}: question-agnostic logits differ from query-aware by {diff:.2e}"
    assert greedy_decode(full, full.first_logits, 6, set()) == greedy_decode(split, logits, 6, set())


def test_generate_modes_fullkv_same_tokens():
    model = build_tiny("qwen2")
    aware = generate(model, TOK, CONTEXT, QUESTIONS[0], FullKV(), max_new_tokens=10)
    agnostic = generate(model, TOK, CONTEXT, QUESTIONS[0], FullKV(), mode="question_agnostic", max_new_tokens=10)
    assert aware.token_ids == agnostic.token_ids
    assert aware.stats["mode"] == "query_aware" and agnostic.stats["mode"] == "question_agnostic"


def test_generate_modes_batch():
    model = build_tiny("qwen2")
    contexts = [CONTEXT, CONTEXT[:70]]
    questions = QUESTIONS[:2]
    both = generate(model, TOK, contexts, questions, DapQ(budget=32, n_pseudo_tokens=8), max_new_tokens=6)
    assert isinstance(both.text, list) and len(both.text) == 2
    for c, q, ids in zip(contexts, questions, both.token_ids):
        alone = generate(model, TOK, c, q, DapQ(budget=32, n_pseudo_tokens=8), max_new_tokens=6)
        assert alone.token_ids == [ids]


# ---------------------------------------------------------------------------------------------------- positions
class RecordingDapQ(DapQ):
    """DapQ that records the LayerInputs the engine hands to it."""

    def select(self, inp, budgets):
        self.__dict__.setdefault("seen", []).append(inp)
        return super().select(inp, budgets)


@pytest.mark.parametrize("n", [1, 8, 32])
@pytest.mark.parametrize("length", [5, 40, 200])
def test_pseudo_positions_follow_the_prompt(length, n):
    assert DapQ(n_pseudo_tokens=n).pseudo_positions(length) == list(range(length, length + n))


@pytest.mark.parametrize("offset", [0, 32, 64])
def test_position_offset_shifts_pseudo_positions(offset):
    method = DapQ(n_pseudo_tokens=8, position_offset=offset)
    assert method.pseudo_positions(100) == list(range(100 + offset, 108 + offset))


@pytest.mark.parametrize("part", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_insert_part_positions_inside_that_third(part, seed):
    length, n = 120, 8
    pos = DapQ(n_pseudo_tokens=n, insert_part=part, seed=seed).pseudo_positions(length)
    lo, hi = (part - 1) * length // 3, part * length // 3
    assert pos == list(range(pos[0], pos[0] + n)), f"not consecutive: {pos}"
    assert lo <= pos[0] and pos[-1] < hi, f"part {part}: positions {pos[0]}..{pos[-1]} outside [{lo}, {hi})"


def test_engine_passes_per_row_pseudo_positions():
    model = build_tiny("llama")
    rows = [40, 23]
    method = RecordingDapQ(budget=12, n_pseudo_tokens=8)
    cc = compress(model, TOK, [random_prompt(n, n) for n in rows], method)
    assert cc.next_pos.tolist() == rows
    assert len(method.seen) == model.config.num_hidden_layers
    inp = method.seen[0]
    t = max(rows)
    for b, n in enumerate(rows):
        assert inp.positions[b, t:].tolist() == list(range(n, n + 8)), f"row {b}: pseudo positions"
        assert inp.positions[b, t - n : t].tolist() == list(range(n)), f"row {b}: prompt positions"
        assert not bool(inp.valid[b, : t - n].any()) and bool(inp.valid[b, t - n :].all()), f"row {b}: validity"


@pytest.mark.parametrize(
    "kwargs",
    [{"position_offset": 32}, {"insert_part": 1}, {"insert_part": 2}, {"insert_part": 3}],
    ids=["offset32", "part1", "part2", "part3"],
)
def test_engine_uses_shifted_and_inserted_positions(kwargs):
    model = build_tiny("qwen3")
    length = 90
    method = RecordingDapQ(budget=24, n_pseudo_tokens=8, **kwargs)
    cc = compress(model, TOK, [random_prompt(length, 50)], method)
    assert method.seen[0].positions[0, length:].tolist() == method.pseudo_positions(length)
    assert cc.next_pos.tolist() == [length], "decoding must start at L whatever the pseudo positions were"
    for i, track in enumerate(cc.state.tracks):
        assert bool((track.pos < length).all()), f"layer {i}: a pseudo entry survived"
        assert bool((track.valid.sum(-1) == 24).all()), f"layer {i}: {track.valid.sum(-1).tolist()}"


# ---------------------------------------------------------------------------------------------------- contents
@pytest.mark.parametrize(
    ("content", "n", "check"),
    [
        ("auto", 32, lambda p, ids: ids == p[:4] + p[-28:]),  # F4_L28, the paper's Llama setting
        ("F2_L6", 8, lambda p, ids: ids == p[:2] + p[-6:]),
        ("RS_C", 8, lambda p, ids: all(i in p for i in ids)),
        ("RC_C", 8, lambda p, ids: any(p[s : s + 8] == ids for s in range(len(p) - 7))),
        ("Fix_C", 8, lambda p, ids: ids == (TOK.encode("Sorry, I don't know. ", add_special_tokens=False) * 2)[:8]),
        ("random_vocab", 8, lambda p, ids: all(0 <= i < 128 for i in ids)),
    ],
    ids=["auto", "F2_L6", "RS_C", "RC_C", "Fix_C", "random_vocab"],
)
def test_pseudo_contents(content, n, check):
    prompt = random_prompt(60, 60)
    ids = DapQ(n_pseudo_tokens=n, content=content).pseudo_ids(prompt, 128, TOK)
    assert len(ids) == n
    assert check(prompt, ids), f"{content}: {ids}"
