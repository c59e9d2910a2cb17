"""`dapq.compressing`: transformers' own `model.generate` with the prompt compressed by a dapq method.

Must hold: under FullKV the tokens are plain `model.generate`'s (greedy, sampling with a fixed seed, beam search) on
a tiny model of every tested family; under compression greedy `model.generate` equals `dapq.generate` for every
method, both layouts and left-padded batches; positions stay the model's own; the cache holds the budget; a
returned cache continues with a new turn; the modes that roll a cache back are refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from dapq import FullKV, compressing, generate, get_method, list_methods
from dapq.errors import DapqError
from dapq.prompts import build_prompt, stop_token_ids
from helpers import METHOD_PARAMS, TINY, TinyTokenizer, build_tiny, random_prompt, until_stop

TOK = TinyTokenizer()
STOPS = sorted(stop_token_ids(TOK))
METHODS = sorted(list_methods())


def cut(tokens: list[int], stops: set[int] | list[int]) -> list[int]:
    return until_stop(tokens, stops)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), t), dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, t - len(p) :] = torch.tensor(p)
        mask[b, t - len(p) :] = 1
    return ids, mask


def run_generate(model, ids, mask, method=None, **kwargs):
    kwargs = {"max_new_tokens": 8, "eos_token_id": STOPS, "pad_token_id": 0, **kwargs}
    with torch.inference_mode():
        if method is None:
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        with compressing(model, method, tokenizer=TOK):
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("family", list(TINY))
def test_fullkv_greedy_and_sampling_equal_plain_generate(family):
    model = build_tiny(family)
    prompts = [random_prompt(40, 3), random_prompt(29, 4)]
    ids, mask = left_padded(prompts)
    plain = run_generate(model, ids, mask, do_sample=False)
    inside = run_generate(model, ids, mask, FullKV(), do_sample=False)
    assert inside.tolist() == plain.tolist(), family
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain = run_generate(model, ids, mask, do_sample=True, temperature=1.3, top_k=0, top_p=0.95)
        torch.manual_seed(seed)
        inside = run_generate(model, ids, mask, FullKV(), do_sample=True, temperature=1.3, top_k=0, top_p=0.95)
        assert inside.tolist() == plain.tolist(), f"{family} seed {seed}"


def test_fullkv_beam_search_equals_plain_generate():
    model = build_tiny("llama")
    ids, mask = left_padded([random_prompt(33, 8), random_prompt(40, 9)])
    plain = run_generate(model, ids, mask, num_beams=3, do_sample=False, eos_token_id=None)
    inside = run_generate(model, ids, mask, FullKV(), num_beams=3, do_sample=False, eos_token_id=None)
    assert inside.tolist() == plain.tolist()


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
@pytest.mark.parametrize("method_name", METHODS)
def test_compressed_greedy_equals_dapq_generate(method_name, layout):
    """A left-padded batch of two prompts: model.generate inside the block gives dapq.generate's tokens."""
    model = build_tiny("qwen2")
    method = get_method(method_name, budget=20, layout=layout, **METHOD_PARAMS.get(method_name, {}))
    contexts = ["the quick brown fox jumps over the lazy dog " * 2, "pack my box with five dozen liquor jugs"]
    question = "what jumps?"
    ref = generate(model, TOK, contexts, [question, question], method, max_new_tokens=8)
    prompts = [sum(build_prompt(TOK, c, question), []) for c in contexts]
    ids, mask = left_padded(prompts)
    out = run_generate(model, ids, mask, method, do_sample=False)
    got = [cut(row[ids.shape[1] :].tolist(), STOPS) for row in out]
    assert got == ref.token_ids, f"{method.describe()}: inside generate {got} != dapq.generate {ref.token_ids}"


def test_positions_are_the_models_and_the_cache_holds_the_budget():
    """The next token of a prompt of L tokens goes to position L; no prompt token is fed again; each layer keeps the
    budget plus the tokens fed since."""
    model = build_tiny("llama")
    prompt = random_prompt(60, 11)
    seen = []
    with torch.inference_mode(), compressing(model, "snapkv", tokenizer=TOK, budget=16, window=4) as session:
        step = session.step

        def spy(cc, kwargs):
            seen.append((tuple(kwargs["input_ids"].shape), cc.next_pos.tolist()))
            return step(cc, kwargs)

        session.step = spy
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        cc = session.last
    assert out.shape[1] == 60 + 6
    assert seen == [((1, 1), [60 + i]) for i in range(5)]  # one new token a step, at 60, 61, ...
    for i, layer in enumerate(cc.cache.layers):
        assert layer.keys.shape[2] == 16 + 5, f"layer {i}"
        pos = cc.state.tracks[i].pos[0, 0]
        assert pos[-5:].tolist() == [60, 61, 62, 63, 64]
        assert int(pos[:16].max()) < 60
    assert cc.cache.get_seq_length() == 65  # what generate reads: prompt + tokens fed


def test_a_returned_cache_continues_with_a_new_turn():
    """Pass the compressed cache back with the whole sequence plus a new turn: only the turn is fed, after it, and
    the tokens equal appending the turn to dapq's own compressed cache."""
    from dapq.engine import append, compress, greedy_decode

    model = build_tiny("llama")
    prompt, turn = random_prompt(50, 12), random_prompt(7, 13)
    method = get_method("snapkv", budget=16, window=4)
    with torch.inference_mode(), compressing(model, method, tokenizer=TOK):
        first = model.generate(
            torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True
        )
        seq = torch.cat([first.sequences, torch.tensor([turn])], dim=1)
        second = model.generate(
            seq, past_key_values=first.past_key_values, max_new_tokens=5, min_new_tokens=5, do_sample=False
        )
    cc = compress(model, TOK, [prompt], method)
    answer = greedy_decode(cc, cc.first_logits, 4, set())[0]
    assert first.sequences[0, 50:].tolist() == answer
    cc.next_pos = cc.next_pos + 3  # greedy_decode fed 3 of the 4 answer tokens (it leaves next_pos to the caller)
    logits = append(cc, [answer[-1:] + turn])  # the last answer token was never fed
    want = greedy_decode(cc, logits, 5, set())[0]
    assert second[0, seq.shape[1] :].tolist() == want


def test_refused_modes_and_inputs_are_one_line_errors():
    model = build_tiny("llama")
    ids = torch.tensor([random_prompt(30, 1)])
    with compressing(model, "snapkv", tokenizer=TOK, budget=16, window=4):
        with pytest.raises(DapqError, match="prompt_lookup_num_tokens"):
            model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=4)
        with pytest.raises(DapqError, match="left padding"):
            model.generate(ids, attention_mask=torch.tensor([[1] * 29 + [0]]), max_new_tokens=2)
        with pytest.raises(DapqError, match="already open"), compressing(model, "full", tokenizer=TOK):
            pass
    with pytest.raises(DapqError, match="tokenizer"), compressing(model, "full", tokenizer=None):
        pass
    with pytest.raises(DapqError, match="Unknown method|valid"), compressing(model, "nope", tokenizer=TOK):
        pass
    assert "forward" not in vars(model) and "generate" not in vars(model)  # restored, also after errors


def test_the_forward_is_restored_when_the_block_raises():
    model = build_tiny("llama")
    with pytest.raises(RuntimeError), compressing(model, "full", tokenizer=TOK):
        raise RuntimeError("user code failed")
    assert "forward" not in vars(model) and "generate" not in vars(model)
    plain = run_generate(model, torch.tensor([random_prompt(20, 2)]), None, do_sample=False)
    assert plain.shape[1] > 20


# ---------------------------------------------------------------------------------------------------- bundled
@pytest.mark.bundled
def test_bundled_inside_generate(bundled):
    """On SmolLM2: FullKV inside == plain model.generate (greedy and seeded sampling), and a compressed method
    inside == dapq.generate."""
    from test_noop import CHAT_CONTEXT, CHAT_QUESTION

    model, tok = bundled
    c, q = build_prompt(tok, CHAT_CONTEXT, CHAT_QUESTION)
    ids = torch.tensor([c + q])
    stops = sorted(stop_token_ids(tok))
    kw = {"max_new_tokens": 12, "eos_token_id": stops, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        plain = model.generate(ids, do_sample=False, **kw)
        with compressing(model, "full", tokenizer=tok):
            inside = model.generate(ids, do_sample=False, **kw)
        assert inside.tolist() == plain.tolist()
        torch.manual_seed(3)
        plain = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.9, **kw)
        torch.manual_seed(3)
        with compressing(model, "full", tokenizer=tok):
            inside = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.9, **kw)
        assert inside.tolist() == plain.tolist()
        method = get_method("dapq", budget=64)
        ref = generate(model, tok, CHAT_CONTEXT, CHAT_QUESTION, method, max_new_tokens=12)
        with compressing(model, method, tokenizer=tok) as session:
            out = model.generate(ids, do_sample=False, **kw)
        assert cut(out[0, ids.shape[1] :].tolist(), stops) == ref.token_ids[0]
        assert session.last.stats["kept_mean"] == 64


# ------------------------------------------------------------------------------------- dapq.generate sampling
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_dapq_generate_sampling_equals_transformers(family):
    """dapq.generate(sampling=Sampling(..., seed=s)) under FullKV draws the tokens model.generate draws after
    torch.manual_seed(s), with the same temperature / top-k / top-p (a batch included)."""
    from dapq import Sampling

    model = build_tiny(family)
    contexts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs!"]
    question = "what?"
    prompts = [sum(build_prompt(TOK, c, question), []) for c in contexts]
    ids, mask = left_padded(prompts)
    for seed, (temp, k, p) in enumerate([(1.0, 0, 1.0), (0.7, 20, 0.9), (1.5, 0, 0.8)]):
        out = generate(
            model, TOK, contexts, [question] * 2, FullKV(), max_new_tokens=10,
            sampling=Sampling(temperature=temp, top_k=k, top_p=p, seed=seed),
        )  # fmt: skip
        torch.manual_seed(seed)
        ref = run_generate(model, ids, mask, max_new_tokens=10, do_sample=True, temperature=temp, top_k=k, top_p=p)
        want = [cut(row[ids.shape[1] :].tolist(), STOPS) for row in ref]
        assert out.token_ids == want, f"{family} seed {seed}"
    greedy = generate(model, TOK, contexts[0], question, FullKV(), max_new_tokens=10)
    drawn = {
        tuple(generate(model, TOK, contexts[0], question, max_new_tokens=10, sampling=Sampling(seed=s)).token_ids[0])
        for s in range(4)
    }
    assert len(drawn | {tuple(greedy.token_ids[0])}) > 1  # sampling is not greedy decoding in disguise


def test_sampling_settings_are_checked():
    from dapq import Sampling

    for bad in ({"temperature": 0}, {"temperature": float("nan")}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
                {"seed": -3}, {"temperature": True}):  # fmt: skip
        with pytest.raises(DapqError):
            Sampling(**bad)


class Collect:
    def __init__(self):
        self.parts, self.ended = [], 0

    def put(self, value):
        self.parts.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("method_name", ["full", "snapkv", "laq"])
def test_streamer_gets_every_token_as_it_comes(method_name):
    model = build_tiny("llama")
    method = get_method(method_name, budget=16, **METHOD_PARAMS.get(method_name, {}))
    streamer = Collect()
    out = generate(model, TOK, "the quick brown fox " * 3, "what?", method, max_new_tokens=9, streamer=streamer)
    assert [t for part in streamer.parts for t in part] == out.token_ids[0]
    assert all(len(part) == 1 for part in streamer.parts) and streamer.ended == 1
    # and inside model.generate, transformers' own streamer protocol is served unchanged
    ids = torch.tensor([sum(build_prompt(TOK, "the quick brown fox " * 3, "what?"), [])])
    inside = Collect()
    with compressing(model, method, tokenizer=TOK):
        got = model.generate(
            ids, max_new_tokens=9, do_sample=False, eos_token_id=STOPS, pad_token_id=0, streamer=inside
        )
    assert inside.parts[0] == ids.tolist() and [p[0] for p in inside.parts[1:]] == got[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("method_name", ["snapkv", "dapq", "learned"])
def test_decode_time_compression_inside_generate_equals_dapq_generate(method_name):
    """With decode_compression, model.generate inside the block gives dapq.generate's tokens (same evictions), and
    no head holds more than budget + interval entries; beam search runs with it."""
    from dapq import DecodeCompression

    model = build_tiny("llama")
    method = get_method(method_name, budget=20, **METHOD_PARAMS.get(method_name, {}))
    dc = DecodeCompression(interval=6, window=3)
    context, question = "the quick brown fox jumps over the lazy dog " * 2, "what jumps?"
    ref = generate(model, TOK, context, question, method, max_new_tokens=40, decode_compression=dc, stop=None)
    ids = torch.tensor([sum(build_prompt(TOK, context, question), [])])
    with compressing(model, method, tokenizer=TOK, decode_compression=dc) as session:
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=STOPS, pad_token_id=0)
        held = max(int(t.valid.sum(-1).max()) for t in session.last.state.tracks)
        beams = model.generate(ids, max_new_tokens=20, num_beams=2, do_sample=False, eos_token_id=None)
    assert cut(out[0, ids.shape[1] :].tolist(), STOPS) == ref.token_ids[0]
    assert ref.stats["evictions"] >= 1 and held <= 20 + 6
    assert beams.shape == (1, ids.shape[1] + 20)
