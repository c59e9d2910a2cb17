"""Decode-time compression (`DecodeCompression`): every `interval` decoded tokens each head is evicted back to the
method's budget, scored by the recent decoded queries (kvpress DecodingPress semantics).

Must hold: a head never holds more than budget + interval entries; with the budget above the total length the
tokens are those of the uncompressed run; the scores are the attention of the recent queries (checked against a
naive loop); the kept set is the top of those scores with the window kept; positions stay true.
"""

from __future__ import annotations

import pytest
import torch

from dapq import DecodeCompression, generate, get_method, list_methods
from dapq.engine import compress, greedy_decode
from dapq.errors import DapqError
from dapq.methods.base import ScorerMethod
from dapq.methods.protocols import layer_budget
from dapq.methods.scoring import aggregate_groups, pool_scores
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()
SCORERS = sorted(n for n in list_methods() if issubclass(type(get_method(n, **METHOD_PARAMS.get(n, {}))), ScorerMethod))


def method_of(name: str, budget: int, layout: str = "kv_head"):
    return get_method(name, budget=budget, layout=layout, **METHOD_PARAMS.get(name, {}))


def test_the_scorers_are_the_expected_ones():
    assert {"snapkv", "pyramidkv", "dapq", "learned", "speckv", "h2o", "expected_attention"} <= set(SCORERS)
    assert not {"full", "laq", "kvzip", "streamingllm"} & set(SCORERS)


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
@pytest.mark.parametrize("name", SCORERS)
def test_a_head_never_holds_more_than_budget_plus_interval(name, layout):
    model = build_tiny("qwen2")
    prompts = [random_prompt(70, 3), random_prompt(55, 4)]
    method = method_of(name, 24, layout)
    cc = compress(model, TOK, prompts, method)
    n_layers = len(cc.cache.layers)
    budgets = [max(layer_budget(method, 24, i, n_layers, n) for n in (70, 55)) for i in range(n_layers)]  # PyramidKV
    dc = DecodeCompression(interval=10, window=5)
    report: dict = {}
    over = []
    original = cc.forward

    def forward(ids, pos, valid):  # every step: no head above its layer's budget + interval
        out = original(ids, pos, valid)
        over.append(max(int(t.valid.sum(-1).max()) - b for t, b in zip(cc.state.tracks, budgets)))
        return out

    cc.forward = forward
    greedy_decode(cc, cc.first_logits, 57, set(), decode_compression=dc, report=report)
    assert report["evictions"] == 56 // 10
    assert max(over) == 10, over  # at most budget + interval, and the cache did fill up to it between evictions
    if name != "pyramidkv":
        assert report["max_entries_per_head"] <= 24 + 10, report
    assert len(report["kv_bytes_steps"]) == 56
    for i, track in enumerate(cc.state.tracks):  # 56 fed tokens: 50 before the last eviction, then 6 more
        assert int(track.valid.sum(-1).max()) <= budgets[i] + 6, f"layer {i}"
        for row, start in ((0, 70), (1, 55)):  # the newest entries are the last decoded tokens, at their positions
            assert track.pos[row, :, -6:].tolist() == [list(range(start + 50, start + 56))] * track.pos.shape[1]


@pytest.mark.parametrize("name", ["snapkv", "dapq", "h2o", "learned", "expected_attention"])
def test_budget_above_the_total_length_changes_nothing(name):
    model = build_tiny("llama")
    prompt = random_prompt(40, 9)
    method = method_of(name, 200)
    cc = compress(model, TOK, [prompt], method)
    report: dict = {}
    got = greedy_decode(cc, cc.first_logits, 60, set(), decode_compression=DecodeCompression(8, 4), report=report)
    ref_cc = compress(model, TOK, [prompt], method)
    assert got == greedy_decode(ref_cc, ref_cc.first_logits, 60, set())
    full_cc = compress(model, TOK, [prompt], get_method("full"))
    assert got == greedy_decode(full_cc, full_cc.first_logits, 60, set())  # and FullKV's
    assert report["evictions"] == 0


def naive_recent_scores(queries, keys, visible, scaling, pooling, kernel, gqa):
    b, h_q, n, _ = queries.shape
    h_c, t = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, h_q, t)
    for r in range(b):
        for h in range(h_q):
            c = h // (h_q // h_c)
            for i in range(n):
                vis = visible[r, c if visible.shape[1] > 1 else 0, i]
                logits = torch.full((t,), float("-inf"))
                logits[vis] = (keys[r, c][vis].double() @ queries[r, h, i].double() * scaling).float()
                out[r, h] += torch.softmax(logits, -1) if vis.any() else 0
    return aggregate_groups(pool_scores(out, pooling, kernel), h_c, gqa)


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_scores_are_the_recent_queries_attention(per_head):
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    visible = torch.rand(2, 2 if per_head else 1, 3, 11, generator=g) > 0.3
    method = get_method("snapkv", budget=8, window=2, kernel=3)
    got = method.decode_scores(queries, keys, visible, 0.35)
    want = naive_recent_scores(queries, keys, visible, 0.35, "max", 3, "mean")
    assert torch.allclose(got, want, atol=1e-5)


def test_the_kept_set_is_the_top_of_the_scores_with_the_window():
    model = build_tiny("llama")
    method = method_of("snapkv", 20)
    cc = compress(model, TOK, [random_prompt(50, 2)], method)
    dc = DecodeCompression(interval=6, window=3)
    from dapq.engine.decode_time import DecodeEvictor

    evictor = DecodeEvictor(cc.state, dc)
    logits, pos = cc.first_logits, int(cc.next_pos[0])
    for _ in range(6):  # fill to budget + interval by hand, then look at the eviction
        tok = logits.argmax(-1)
        logits = cc.forward(tok[:, None], torch.tensor([[pos]]), torch.ones(1, 1, dtype=torch.bool))
        pos += 1
        evictor.since += 1
        for q in cc.state.capture:
            del q[: max(0, len(q) - dc.window)]
    layer, track = cc.cache.layers[1], cc.state.tracks[1]
    before_pos = track.pos.expand(-1, layer.keys.shape[1], -1).clone()
    queries = torch.cat(cc.state.capture[1], dim=2)
    visible = track.valid[:, :, None, :] & (track.pos[:, :, None, :] <= track.pos[:, :, -3:, None])
    scores = method.decode_scores(queries, layer.keys, visible, cc.state.capture_scaling[1])
    evictor.evict()
    for h in range(layer.keys.shape[1]):
        s = scores[0, h].clone()
        s[-3:] = float("inf")
        want = sorted(before_pos[0, h, torch.sort(s, descending=True, stable=True).indices[:20]].tolist())
        assert cc.state.tracks[1].pos[0, h].tolist() == want
    assert layer is cc.cache.layers[1] and cc.cache.layers[1].keys.shape[2] == 20


def test_generate_reports_and_refuses_in_one_line():
    model = build_tiny("llama")
    ctx = "the quick brown fox jumps over the lazy dog " * 3
    out = generate(model, TOK, ctx, "what?", method_of("snapkv", 24), max_new_tokens=30,
                   decode_compression=DecodeCompression(8, 4))  # fmt: skip
    assert "evictions" in out.stats and "kv_bytes_steps" in out.stats
    for method, dc, match in [
        (get_method("streamingllm", budget=24), DecodeCompression(8, 4), "cannot compress during decoding"),
        (method_of("laq", 24), DecodeCompression(8, 4), "cannot compress during decoding"),
        (method_of("snapkv", 24), DecodeCompression(30, 24), "must exceed the window"),
    ]:
        with pytest.raises(DapqError, match=match):
            generate(model, TOK, ctx, "what?", method, max_new_tokens=30, decode_compression=dc)
    for bad in ({"interval": 0}, {"window": 0}, {"interval": 4, "window": 8}, {"interval": 2.5}):
        with pytest.raises(DapqError):
            DecodeCompression(**bad)


def test_a_question_appended_after_the_prompt_is_rescored_before_decoding():
    """Question-agnostic generate and Chat append tokens after the compressed prompt: their queries re-score the
    cache at once, so the bound budget + interval holds from the first decoded token."""
    from dapq import Chat

    model = build_tiny("llama")
    ctx = "the quick brown fox jumps over the lazy dog " * 3
    question = "and what does the lazy dog do all afternoon in the sun?"  # 56 tokens: more than the interval
    dc = DecodeCompression(interval=8, window=4)
    method = method_of("snapkv", 24)
    out = generate(model, TOK, ctx, question, method, mode="question_agnostic", max_new_tokens=30,
                   decode_compression=dc, stop=None)  # fmt: skip
    assert out.stats["max_entries_per_head"] <= 24 + 8, out.stats["max_entries_per_head"]
    chat = Chat(model, TOK, ctx, method)
    for q in (question, "and then?"):
        turn = chat.ask(q, max_new_tokens=20, decode_compression=dc, ignore_stops=True)
        assert turn.stats["max_entries_per_head"] <= 24 + 8, turn.stats["max_entries_per_head"]
        assert max(int(t.valid.sum(-1).max()) for t in chat.cc.state.tracks) <= 24 + 8
