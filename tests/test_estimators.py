"""KVzip and SpecKV: each method's defining property against a direct reference computation on a tiny model, and
the engine's handling of their extra pass (costs reported, one pass per recording, both paths equal)."""

from __future__ import annotations

import pytest
import torch

from dapq import get_method
from dapq.analysis.quantities import topk_indices, window_scores
from dapq.engine import compress, derive, record
from dapq.engine.draft import draft_suffix, suffix_rows
from dapq.errors import DapqError
from dapq.hf.capture import greedy_answer, prefill_prompt, queries_at
from dapq.methods.kvzip import FIRST, LATER
from helpers import TinyTokenizer, build_tiny, capture_qk, kept_sets, plain_greedy, random_prompt

TOK = TinyTokenizer()
L = 40


# ---------------------------------------------------------------------------------------------------- KVzip
def kvzip_reference(model, prompt: list[int], chunk_size: int, n_sink: int = 4) -> dict[int, torch.Tensor]:
    """Per layer [H_kv, L]: for every chunk, a plain transformers forward of prompt + request + chunk (independent
    of dapq's hook), the softmax of the request tokens' logits over sinks + the chunk's prompt keys + the request
    tokens' own keys (causal), max over the request queries and the group; max over chunks."""
    turn_end = TOK.encode("\n", add_special_tokens=False)
    scores: dict[int, torch.Tensor] = {}
    starts = list(range(0, len(prompt), chunk_size))
    for c, start in enumerate(starts):
        end = min(start + chunk_size, len(prompt))
        ask = TOK.encode(FIRST if c == 0 else LATER, add_special_tokens=False)
        if c:
            ask += prompt[max(0, start - 8) : start]
        request = ask + turn_end + prompt[start:end]
        q_len = len(request)
        with capture_qk(model) as cap, torch.inference_mode():
            model(input_ids=torch.tensor([prompt + request]))
        for i, (q, k, scaling) in cap.items():
            q = q[0, :, L:].float()  # [H_q, q, D]
            k = k[0].float()  # [H_kv, L + q, D]
            cols = list(range(min(n_sink, start))) + list(range(start, end)) + list(range(L, L + q_len))
            groups = q.shape[0] // k.shape[0]
            kk = k[:, cols].repeat_interleave(groups, dim=0)
            logits = q @ kk.transpose(-1, -2) * scaling  # [H_q, q, c]
            n_ctx = len(cols) - q_len
            causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(q_len, n_ctx, dtype=torch.bool), causal], dim=1)
            probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            best = probs[..., :n_ctx].amax(dim=1).view(k.shape[0], groups, n_ctx).amax(dim=1)  # [H_kv, c]
            s = torch.zeros(k.shape[0], L)
            span = [j for j, col in enumerate(cols[:n_ctx]) if start <= col < end]
            s[:, start:end] = best[:, span]
            scores[i] = s if i not in scores else torch.maximum(scores[i], s)
    return scores


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_kvzip_scores_are_the_max_attention_of_the_reconstruction_queries(chunk_size):
    model = build_tiny("llama")
    prompt = random_prompt(L, 3)
    method = get_method("kvzip", budget=12, chunk_size=chunk_size)
    rec = record(model, TOK, [prompt])
    derive(rec, method)
    want = kvzip_reference(model, prompt, chunk_size)
    for i, ref in want.items():
        got = rec.memo[i][method.pass_key()][0]  # [H_kv, L]
        diff = float((got - ref).abs().max())
        assert diff < 1e-5, f"layer {i}: KVzip scores differ from the reference by {diff}"


@pytest.mark.parametrize("allocation", ["global", "layer", "head"])
def test_kvzip_keeps_the_top_scores_of_its_allocation(allocation):
    model = build_tiny("llama")
    prompt = random_prompt(L, 5)
    budget = 12
    method = get_method("kvzip", budget=budget, chunk_size=16, allocation=allocation)
    rec = record(model, TOK, [prompt])
    cc = derive(rec, method)
    n_layers = model.config.num_hidden_layers
    scores = torch.stack([rec.memo[i][method.pass_key()][0] for i in range(n_layers)])  # [n_l, H, L]
    scores[..., :4] = float("inf")  # sinks
    h = scores.shape[1]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if allocation == "global":
        keep.view(-1)[torch.topk(scores.reshape(-1), budget * h * n_layers).indices] = True
    elif allocation == "layer":
        for i in range(n_layers):
            keep[i].view(-1)[torch.topk(scores[i].reshape(-1), budget * h).indices] = True
    else:
        keep.scatter_(-1, torch.topk(scores, budget, dim=-1).indices, True)
    for i in range(n_layers):
        for j, got in enumerate(kept_sets(cc, i)):
            want = set(keep[i, j].nonzero().squeeze(-1).tolist())
            assert got == want, f"layer {i} head {j}: extra {sorted(got - want)}, missing {sorted(want - got)}"
            assert set(range(4)) <= got, "the sinks are always kept"
    if allocation == "global":  # the layers really do keep different counts
        counts = {len(s) for i in range(n_layers) for s in kept_sets(cc, i)}
        assert len(counts) > 1


def test_kvzip_one_pass_per_recording_and_its_cost_is_reported():
    model = build_tiny("llama")
    prompt = random_prompt(L, 6)
    rec = record(model, TOK, [prompt])
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first = derive(rec, get_method("kvzip", budget=12, chunk_size=16))
        n_first = len(calls)
        second = derive(rec, get_method("kvzip", budget=20, chunk_size=16))
    finally:
        hook.remove()
    assert n_first == 3, f"3 chunks of 16 tokens: 3 reconstruction forwards, got {n_first}"
    assert len(calls) == n_first, "the second budget reused the recording's pass"
    assert first.stats["pass_s"] > 0 and second.stats["pass_s"] == first.stats["pass_s"]
    served = compress(model, TOK, [prompt], get_method("kvzip", budget=12, chunk_size=16))
    assert served.stats["pass_s"] > 0 and served.stats["prefill_s"] >= served.stats["pass_s"]
    # peak: the full prompt cache plus the longest chunk's entries, in every layer
    h, d, n_layers = model.config.num_key_value_heads, model.config.head_dim, model.config.num_hidden_layers
    longest = max(len(c.ids) for c in get_method("kvzip", chunk_size=16).pass_chunks(prompt, TOK))
    assert served.stats["kv_bytes_peak"] == 2 * n_layers * h * d * 4 * (L + longest)
    for i in range(n_layers):
        assert kept_sets(served, i) == kept_sets(first, i), f"layer {i}: serving and harness keep different sets"


def test_kvzip_validation():
    with pytest.raises(DapqError, match="allocation"):
        get_method("kvzip", allocation="uniform")
    with pytest.raises(DapqError, match="n_sink"):
        get_method("kvzip", budget=4)


# ---------------------------------------------------------------------------------------------------- SpecKV
def test_speckv_self_with_the_answer_length_keeps_the_oracle_set():
    """draft="self" and n = the answer's length: the draft is the model's own greedy answer, so SpecKV keeps the
    analysis suite's oracle set (the real answer queries' top-B, scored over the prompt keys, no pooling)."""
    model = build_tiny("llama")
    prompt = random_prompt(L, 7)
    n, budget = 6, 12
    state = prefill_prompt(model, prompt, keep_last=1)
    answer = greedy_answer(model, state, n, set())
    real = queries_at(model, state, answer, range(L, L + n)).queries
    method = get_method("speckv", budget=budget, n_draft=n, pooling="none", include_pseudo_keys=False)
    assert suffix_rows(method, model, [prompt])[0][0] == answer
    cc = compress(model, TOK, [prompt], method)
    for i in range(model.config.num_hidden_layers):
        gold = topk_indices(window_scores(real[i], state.keys(i), state.scaling[i]), budget)
        for j, got in enumerate(kept_sets(cc, i)):
            assert got == set(gold[j].tolist()), f"layer {i} head {j}: SpecKV(self) differs from the oracle set"


def test_speckv_draft_model_tokens_costs_and_peak():
    target, draft = build_tiny("llama"), build_tiny("qwen3")  # same vocabulary
    prompt = random_prompt(L, 8)
    method = get_method("speckv", budget=12, n_draft=5, draft=draft)
    assert method.draft.startswith("loaded:") and method.draft_model is draft
    tokens, _ = plain_greedy(draft, prompt, 5)
    assert draft_suffix(method, target, [prompt])[0].ids == tokens
    cc = compress(target, TOK, [prompt], method)
    dapq = compress(target, TOK, [prompt], get_method("dapq", budget=12, n_pseudo_tokens=5))
    assert cc.stats["kv_bytes_peak"] == dapq.stats["kv_bytes_peak"], "the target's peak is DapQ's"
    cfg = draft.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cc.stats["draft_kv_bytes_peak"] == per_token * (L + 4)  # prompt + the 4 tokens fed back
    assert cc.stats["draft_s"] > 0 and cc.stats["prefill_s"] >= cc.stats["draft_s"]
    # the harness: one recording with the draft's suffix, and the draft's costs in every derived row
    rec = record(target, TOK, [prompt], suffix=method)
    got = derive(rec, method)
    assert got.stats["draft_s"] == rec.full.stats["draft_s"] > 0  # memoised: the draft ran once for the recording
    for i in range(target.config.num_hidden_layers):
        assert kept_sets(got, i) == kept_sets(cc, i)


def test_speckv_draft_from_a_folder(tmp_path):
    draft = build_tiny("qwen3")
    draft.save_pretrained(tmp_path / "draft")
    prompt = random_prompt(L, 10)
    method = get_method("speckv", budget=12, n_draft=4, draft=str(tmp_path / "draft"))
    assert suffix_rows(method, build_tiny("llama"), [prompt])[0][0] == plain_greedy(draft, prompt, 4)[0]
    with pytest.raises(DapqError, match="Could not load the draft"):
        compress(build_tiny("llama"), TOK, [prompt], get_method("speckv", budget=12, draft=str(tmp_path / "none")))


def test_speckv_draft_must_share_the_vocabulary():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    other = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(DapqError, match="tokenizer"):
        compress(build_tiny("llama"), TOK, [random_prompt(L, 9)], get_method("speckv", budget=12, draft=other))
    with pytest.raises(DapqError, match="draft"):
        get_method("speckv", budget=12, draft=3)
    with pytest.raises(DapqError, match="another process"):
        get_method("speckv", budget=12, draft="loaded:x")
