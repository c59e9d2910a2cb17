"""No-op equivalence: with a budget >= the prompt length every method is plain transformers.

First-token logits and several greedy decode steps are compared with a plain transformers loop (its own cache, masks
and positions) on tiny random models of every supported family, and with `model.generate` on the bundled model.
"""

from __future__ import annotations

import pytest
import torch

from dapq import FullKV, generate, get_method, list_methods
from dapq.engine import append, compress, greedy_decode
from dapq.prompts import stop_token_ids
from helpers import METHOD_PARAMS, TINY, TinyTokenizer, build_tiny, max_diff, plain_greedy, random_prompt

METHODS = sorted(list_methods())
FAMILIES = list(TINY)  # llama (sdpa and eager), qwen2 (and 14/2 heads), qwen3, mistral, phi3, gemma, gemma2, gemma3
L = 40
STEPS = 5
ATOL = 1e-5
TOK = TinyTokenizer()
# a budget that covers the prompt (and small windows so every method accepts it)
PARAMS = METHOD_PARAMS


def noop_method(name: str, layout: str = "kv_head", budget: int = 64):
    return get_method(name, budget=budget, layout=layout, **PARAMS.get(name, {}))


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_identical_to_transformers(family, method_name, layout):
    model = build_tiny(family)
    prompt = random_prompt(L, 5)
    ref_tokens, ref_logits = plain_greedy(model, prompt, STEPS)
    cc = compress(model, TOK, [prompt], noop_method(method_name, layout))
    assert [layer.keys.shape[2] for layer in cc.cache.layers] == [L] * model.config.num_hidden_layers
    diff = max_diff(cc.first_logits[0], ref_logits[0])
    assert diff < ATOL, f"{family}/{method_name}/{layout}: first-token logits max abs diff {diff:.2e}"
    for step, token in enumerate(ref_tokens[:-1]):
        got = append(cc, [[token]])[0]
        diff = max_diff(got, ref_logits[step + 1])
        assert diff < ATOL, f"{family}/{method_name}/{layout}: decode step {step + 1} logits max abs diff {diff:.2e}"
    assert cc.next_pos.tolist() == [L + STEPS - 1]


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical_to_transformers(family, method_name):
    model = build_tiny(family)
    prompt = random_prompt(L, 6)
    ref_tokens, _ = plain_greedy(model, prompt, 8)
    cc = compress(model, TOK, [prompt], noop_method(method_name))
    got = greedy_decode(cc, cc.first_logits, 8, set())[0]
    assert got == ref_tokens, f"{family}/{method_name}: greedy tokens {got} != transformers {ref_tokens}"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_plain_reference_is_model_generate(family):
    """The manual reference loop used above agrees with model.generate (greedy)."""
    model = build_tiny(family)
    prompt = random_prompt(L, 7)
    ref_tokens, _ = plain_greedy(model, prompt, 8)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None
        )
    assert out[0, L:].tolist() == ref_tokens


@pytest.mark.parametrize("method_name", METHODS)
def test_generate_end_to_end_matches_transformers(method_name):
    """dapq.generate (prompt building, stop tokens, decoding) on a tiny model equals a plain greedy loop."""
    model = build_tiny("qwen2")
    context, question = "The quick brown fox jumps over the lazy dog. " * 2, "What jumps?"
    ids = TOK.encode(context + "\n\n") + TOK.encode(question, add_special_tokens=False)
    out = generate(model, TOK, context, question, noop_method(method_name, budget=len(ids)), max_new_tokens=10)
    assert out.stats["prompt_tokens"] == [len(ids)]
    ref_tokens, _ = plain_greedy(model, ids, 10)
    stops = stop_token_ids(TOK)
    expected = []
    for token in ref_tokens:
        if token in stops:
            break
        expected.append(token)
    assert out.token_ids == [expected]
    assert out.text == TOK.decode(expected, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------- bundled
CHAT_CONTEXT = (
    "The lighthouse on Karren Point was built in 1874 by a shipping company that had lost three vessels on the reef "
    "in a single winter. Its first keeper, Ada Moreland, kept a logbook for forty-one years; she recorded every "
    "passing ship, the weather at dawn and dusk, and the migrating birds that struck the lantern glass in autumn. "
    "In 1921 the oil lamp was replaced by an electric light, and in 1968 the station was automated and the keeper's "
    "cottage became a small museum. Today the logbooks are kept in the county archive, where historians use them "
    "to study changes in storm frequency and in the timing of bird migration along the coast."
)
CHAT_QUESTION = "Who was the first keeper of the lighthouse, and for how long did she keep the logbook?"


@pytest.mark.bundled
def test_bundled_fullkv_matches_model_generate(bundled):
    model, tok = bundled
    out = generate(model, tok, CHAT_CONTEXT, CHAT_QUESTION, FullKV(), max_new_tokens=16)
    assert 150 <= out.stats["prompt_tokens"][0] <= 300, out.stats["prompt_tokens"]
    ctx_ids, q_ids = __import__("dapq").build_prompt(tok, CHAT_CONTEXT, CHAT_QUESTION)
    with torch.inference_mode():
        ref = model.generate(
            torch.tensor([ctx_ids + q_ids]),
            attention_mask=torch.ones(1, len(ctx_ids) + len(q_ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new = ref[0, len(ctx_ids) + len(q_ids) :].tolist()
    stops = stop_token_ids(tok)
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    assert out.token_ids[0] == new[:cut], (
        f"dapq: {out.text!r}\ntransformers: {tok.decode(new[:cut], skip_special_tokens=True)!r}"
    )
    assert out.text == tok.decode(new[:cut], skip_special_tokens=True)
    assert len(out.token_ids[0]) > 0
