"""Invariants every registered method must satisfy, table-driven over `list_methods()` and both cache layouts.

After `compress`: each layer and head holds exactly its budget of real prompt tokens, no pseudo-token entry survives,
the kept tokens are the top-scored ones (scores recomputed from a plain transformers forward), decoding continues at
position L, pads are never kept, and a left-padded batch gives each row the same result as running it alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dapq import LayerInputs, ScorerMethod, get_method, list_methods
from dapq.engine import append, compress, greedy_decode
from dapq.engine.draft import suffix_rows
from dapq.methods.protocols import EmbeddedSuffix, PseudoSuffix, layer_budget, pooled_budget, pseudo_length
from helpers import (
    METHOD_PARAMS,
    TinyTokenizer,
    build_tiny,
    cache_from_tensors,
    capture_qk,
    max_diff,
    plain_greedy,
    plain_rotary,
    random_prompt,
    sliding_layers,
)

METHODS = sorted(list_methods())
LAYOUTS = ["kv_head", "query_head"]
# per-method parameters that make the tiny prompts meaningful (a window of 32 would not fit a budget of 12)
PARAMS: dict[str, dict[str, Any]] = METHOD_PARAMS
# extra scorer variants: every knob that changes the ranking
VARIANTS: list[tuple[str, dict[str, Any]]] = [(m, {}) for m in METHODS] + [
    ("snapkv", {"gqa": "max"}),
    ("snapkv", {"pooling": "none"}),
    ("dapq", {"gqa": "max"}),
    ("dapq", {"pooling": "avg", "kernel": 3}),
    ("dapq", {"pooling": "none"}),
    ("dapq", {"include_pseudo_keys": False}),
    ("dapq", {"keep_recent": 3}),
    ("dapq", {"content": "random_vocab", "n_pseudo_tokens": 16}),
    ("dapq", {"content": "Fix_C"}),
    ("dapq", {"position_offset": 24}),
    ("expected_attention", {"use_covariance": False}),
    ("expected_attention", {"use_vnorm": False, "gqa": "max"}),
    ("expected_attention", {"n_future_positions": 1, "n_sink": 0}),
]
# methods that rank tokens by a score (the top-k check applies to them)
SCORERS = [v for v in VARIANTS if issubclass(list_methods()[v[0]], ScorerMethod)]
L = 40
BUDGET = 12
TOK = TinyTokenizer()


def make(name: str, budget: int | float | None = BUDGET, layout: str = "kv_head", **extra: Any):
    return get_method(name, budget=budget, layout=layout, **{**PARAMS.get(name, {}), **extra})


def variant_id(v: tuple[str, dict[str, Any]]) -> str:
    name, extra = v
    return name + "".join(f"-{k}={val}" for k, val in extra.items())


def expected_kept(method, prompt_len: int, layer_idx: int, n_layers: int, sliding: bool) -> int:
    """Real tokens one head of one layer keeps: the (per-layer) budget, at most the prompt; all of it if untouched."""
    if sliding or not method.compresses:
        return prompt_len
    budget = method.token_budget(prompt_len)
    return min(layer_budget(method, budget, layer_idx, n_layers, prompt_len), prompt_len)


def n_cache_heads(model, layout: str) -> int:
    return model.config.num_attention_heads if layout == "query_head" else model.config.num_key_value_heads


def kept_sets(cc, layer_idx: int, row: int) -> list[set[int]]:
    """Original positions of the real tokens each cache head keeps."""
    track = cc.state.tracks[layer_idx]
    h_c = cc.cache.layers[layer_idx].keys.shape[1]
    pos = track.pos[row].expand(h_c, -1)
    valid = track.valid[row].expand(h_c, -1)
    return [set(pos[h][valid[h]].tolist()) for h in range(h_c)]


# ---------------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("model_name", ["llama", "qwen3", "qwen2_gqa7", "gemma2", "mistral_window"])
@pytest.mark.parametrize("budget", [BUDGET, 0.25, 64], ids=["budget12", "ratio0.25", "budget64>L"])
def test_budget_and_no_pseudo_entries(model_name, method_name, layout, budget):
    model = build_tiny(model_name)
    method = make(method_name, budget=budget, layout=layout)
    cc = compress(model, TOK, [random_prompt(L, 1)], method)
    n_layers = model.config.num_hidden_layers
    h_c = n_cache_heads(model, layout)
    assert int(cc.next_pos[0]) == L, f"next position {int(cc.next_pos[0])}, expected L={L}"
    pooled = pooled_budget(method)  # KVzip: counts vary per layer and head, the row's total holds
    total_want = total_kept = 0
    for i, (layer, track, sliding) in enumerate(zip(cc.cache.layers, cc.state.tracks, sliding_layers(model))):
        want = expected_kept(method, L, i, n_layers, sliding)
        b, h, k, d = layer.keys.shape
        assert (b, h) == (1, h_c), f"layer {i}: keys {tuple(layer.keys.shape)}, expected {h_c} cache heads"
        assert layer.values.shape == layer.keys.shape
        counts = track.valid.expand(1, h_c, -1).sum(-1)
        if pooled and not sliding:
            assert k == int(counts.max()), f"layer {i}: cache length {k}, largest head count {int(counts.max())}"
            total_want, total_kept = total_want + want * h_c, total_kept + int(counts.sum())
        else:
            assert k == want, f"layer {i}: cache length {k}, expected {want} (budget {budget}, sliding={sliding})"
            assert bool((counts == want).all()), f"layer {i}: valid entries per head {counts.tolist()}, expected {want}"
        assert bool((track.pos >= 0).all()) and bool((track.pos < L).all()), (
            f"layer {i}: a pseudo-token entry (position >= L={L}) survived: {track.pos.max().item()}"
        )
        for head, kept in enumerate(kept_sets(cc, i, 0)):
            assert len(kept) == int(counts[0, head]), f"layer {i} head {head}: duplicate kept positions"
    assert total_kept == total_want, f"kept {total_kept} entries over the layers and heads, budget {total_want}"
    assert cc.stats["kv_bytes_compressed"] <= cc.stats["kv_bytes_full"] * (h_c // model.config.num_key_value_heads)
    assert cc.stats["pseudo_tokens"] == pseudo_length(method)


# ---------------------------------------------------------------------------------------------------- top-k
def reference_inputs(model, method, prompt: list[int], layout: str) -> tuple[dict[int, LayerInputs], int]:
    """LayerInputs of every layer from a plain transformers forward of prompt + pseudo suffix (not dapq's hook):
    rotated queries and keys, values, and the model's own rotary embedding (for pre-RoPE queries)."""
    n = len(prompt)
    ids = prompt + (suffix_rows(method, model, [prompt], TOK)[0][0] if isinstance(method, PseudoSuffix) else [])
    pos = list(range(n)) + (method.pseudo_positions(n) if isinstance(method, PseudoSuffix) else [])
    assert pos == sorted(pos), "the reference forward is causal by sequence order: positions must increase"
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    values: dict[int, torch.Tensor] = {}
    with capture_qk(model, values) as cap, torch.inference_mode():
        if isinstance(method, EmbeddedSuffix):  # learned vectors after the prompt's own token embeddings
            table = model.get_input_embeddings().weight
            embeds = torch.cat([table[torch.tensor(prompt)], method.suffix_embeddings(model.config).to(table)])
            model(inputs_embeds=embeds[None], position_ids=torch.tensor([pos]))
        else:
            model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]))
    out = {}
    for i, (q, k, scaling) in cap.items():
        v = values[i]
        if layout == "query_head":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out[i] = LayerInputs(
            queries=q,
            keys=k,
            values=v,
            rotary=plain_rotary(model),
            positions=torch.tensor([pos]),
            valid=torch.ones(1, len(pos), dtype=torch.bool),
            budgets=torch.tensor([method.token_budget(n)]),
            prompt_len=n,
            scaling=scaling,
            layer_idx=i,
            n_layers=model.config.num_hidden_layers,
        )
    return out, groups


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", SCORERS, ids=variant_id)
@pytest.mark.parametrize("model_name", ["llama", "qwen3", "qwen2_gqa7"])
def test_kept_tokens_are_top_scored(model_name, variant, layout):
    name, extra = variant
    method = make(name, layout=layout, **extra)
    model = build_tiny(model_name)
    prompt = random_prompt(L, 2)
    cc = compress(model, TOK, [prompt], method)
    ref, groups = reference_inputs(model, method, prompt, layout)
    for i, inp in ref.items():
        want = min(layer_budget(method, method.token_budget(L), i, len(ref), L), L)
        scores = method.scores(inp)[0]  # [H_c, L]
        ref_keys = inp.keys[0, :, :L]  # [H_c, L, D]
        layer = cc.cache.layers[i]
        for h, kept in enumerate(kept_sets(cc, i, 0)):
            s = scores[h]
            kept_idx = torch.tensor(sorted(kept))
            dropped = torch.tensor(sorted(set(range(L)) - kept))
            top = set(torch.topk(s, want).indices.tolist())
            worst_kept, best_dropped = float(s[kept_idx].min()), float(s[dropped].max())
            tol = 1e-5 * max(1.0, abs(best_dropped)) if best_dropped != float("inf") else 0.0
            assert worst_kept >= best_dropped - tol, (
                f"layer {i} head {h}: kept set is not the top-{want}: kept-only {sorted(kept - top)} "
                f"(scores {s[sorted(kept - top)].tolist()}), top-only {sorted(top - kept)} "
                f"(scores {s[sorted(top - kept)].tolist()}); worst kept {worst_kept}, best dropped {best_dropped}"
            )
            # the cache holds exactly those tokens' keys (rotated at their original positions), in prompt order
            track_pos = cc.state.tracks[i].pos[0].expand(layer.keys.shape[1], -1)[h]
            assert track_pos.tolist() == sorted(kept), f"layer {i} head {h}: kept cache is not in prompt order"
            diff = max_diff(layer.keys[0, h], ref_keys[h, track_pos])
            assert diff < 1e-5, f"layer {i} head {h}: cached keys differ from the reference keys by {diff}"


def _pool(s: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """Reference 1-D pooling along the last axis with windows [j - kernel//2, j + kernel//2] clipped to the row."""
    if kind == "none":
        return s
    r = kernel // 2
    out = torch.empty_like(s)
    for j in range(s.shape[-1]):
        win = s[..., max(0, j - r) : j + r + 1]
        out[..., j] = win.amax(-1) if kind == "max" else win.sum(-1) / kernel  # avg_pool1d counts the zero padding
    return out


def reference_scores(method, q: torch.Tensor, k: torch.Tensor, n: int, scaling: float) -> torch.Tensor:
    """Scores [H_kv, n] written from the papers' definitions, one head and one query at a time, in float64.

    q [H_q, S, D], k [H_kv, S, D] of one unpadded row (S = n + pseudo tokens).
    """
    h_q, h_kv = q.shape[0], k.shape[0]
    g = h_q // h_kv
    s = torch.zeros(h_q, n, dtype=torch.float64)
    if method.name == "dapq":
        queries = range(n, q.shape[1])
        n_keys = (lambda i: i + 1) if method.include_pseudo_keys else (lambda i: n)
    else:  # snapkv: the last `window` prompt queries, causal
        queries = range(n - min(method.window, n), n)
        n_keys = lambda i: i + 1  # noqa: E731
    for h in range(h_q):
        for i in queries:
            logits = (k[h // g, : n_keys(i)].double() @ q[h, i].double()) * scaling
            probs = torch.softmax(logits, -1)[:n]
            s[h, : probs.shape[0]] += probs
    if method.name == "snapkv":
        s[:, n - method.window :] = 0.0
    s = _pool(s, method.pooling, method.kernel)
    s = s.reshape(h_kv, g, n)
    s = s.mean(1) if method.gqa == "mean" else s.amax(1)
    forced = n - method.window if method.name == "snapkv" else n - method.keep_recent
    s[:, forced:] = float("inf")
    return s


@pytest.mark.parametrize(
    "variant",
    [v for v in VARIANTS if v[0] in ("dapq", "snapkv") and v[1].get("content") is None],
    ids=variant_id,
)
def test_scores_match_the_spec(variant):
    """method.scores on captured q/k equals a loop-by-loop float64 transcription of the spec."""
    name, extra = variant
    method = make(name, **extra)
    model = build_tiny("qwen3")
    ref, _ = reference_inputs(model, method, random_prompt(L, 3), "kv_head")
    for i, inp in ref.items():
        got = method.scores(inp)[0].double()
        want = reference_scores(method, inp.queries[0], inp.keys[0], L, inp.scaling)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"layer {i}: force-kept tokens differ"
        finite = ~torch.isinf(want)
        diff = max_diff(got[finite], want[finite])
        assert diff < 1e-5, f"layer {i}: scores differ from the reference by {diff}"


# ---------------------------------------------------------------------------------------------------- decoding at L
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("model_name", ["llama", "qwen3", "qwen2_gqa7", "phi3"])
def test_next_token_goes_to_position_L(model_name, method_name):
    """One decode step on the compressed cache equals plain transformers fed the same pruned KV at position L."""
    model = build_tiny(model_name)
    prompt = random_prompt(L, 4)
    method = make(method_name)
    if pooled_budget(method):  # plain transformers cannot mask per-head filler slots: the uniform allocation
        method = make(method_name, allocation="head")
    cc = compress(model, TOK, [prompt], method)
    assert cc.next_pos.tolist() == [L]
    token = int(cc.first_logits[0].argmax())
    kept = cc.cache.layers[0].keys.shape[2]
    plain_cache, wrong_cache = cache_from_tensors(cc.cache), cache_from_tensors(cc.cache)
    got = append(cc, [[token]])[0]
    assert cc.next_pos.tolist() == [L + 1]
    with torch.inference_mode():
        want = model(torch.tensor([[token]]), position_ids=torch.tensor([[L]]), past_key_values=plain_cache).logits
        wrong = model(torch.tensor([[token]]), position_ids=torch.tensor([[kept]]), past_key_values=wrong_cache).logits
    diff = max_diff(got, want[0, -1])
    assert diff < 1e-5, f"decode step differs from plain transformers at position L={L} by {diff}"
    if kept < L:  # the test can tell the positions apart: at the cache length the logits are different
        assert max_diff(got, wrong[0, -1]) > 1e-3, "decoding at the cache length gives the same logits as at L"
    if method_name == "full":  # full cache: exactly plain transformers' next-token logits
        _, ref_logits = plain_greedy(model, prompt + [token], 1)
        diff = max_diff(got, ref_logits[0])
        assert diff < 1e-5, f"FullKV decode step differs from plain transformers by {diff}"


# ---------------------------------------------------------------------------------------------------- batches, pads
ROWS = [40, 23, 31]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("budget", [BUDGET, 30], ids=["budget12", "budget30>short_row"])
def test_pads_never_kept(method_name, layout, budget):
    model = build_tiny("llama")
    prompts = [random_prompt(n, 10 + n) for n in ROWS]
    method = make(method_name, budget=budget, layout=layout)
    cc = compress(model, TOK, prompts, method)
    assert cc.next_pos.tolist() == ROWS
    pooled = pooled_budget(method)  # KVzip: per-layer/head counts vary, each row's total over them holds
    totals = [[0, 0] for _ in ROWS]  # per row: kept, budget
    for i, (layer, track) in enumerate(zip(cc.cache.layers, cc.state.tracks)):
        h_c = layer.keys.shape[1]
        wants = [expected_kept(method, n, i, model.config.num_hidden_layers, False) for n in ROWS]
        # invalid entries are only filler (rows with a smaller budget, or the pads FullKV keeps masked)
        longest = int(track.valid.expand(-1, h_c, -1).sum(-1).max()) if pooled else max(wants)
        assert tuple(layer.keys.shape[:3]) == (len(ROWS), h_c, longest), f"layer {i}: {tuple(layer.keys.shape)}"
        for b, (n, want) in enumerate(zip(ROWS, wants)):
            valid = track.valid[b].expand(h_c, -1)
            pos = track.pos[b].expand(h_c, -1)
            counts = valid.sum(-1)
            totals[b][0] += int(counts.sum())
            totals[b][1] += want * h_c
            assert pooled or bool((counts == want).all()), (
                f"layer {i} row {b} (L={n}): valid per head {counts.tolist()} != {want}"
            )
            for h in range(h_c):
                real = pos[h][valid[h]]
                assert bool((real >= 0).all() and (real < n).all()), f"layer {i} row {b} head {h}: {real.tolist()}"
                assert len(set(real.tolist())) == int(counts[h]), f"layer {i} row {b} head {h}: a pad was kept"
    for b, (kept, want) in enumerate(totals):
        assert kept == want, f"row {b}: {kept} entries kept over layers and heads, budget {want}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("model_name", ["llama", "qwen3", "qwen2_gqa7", "gemma2", "mistral_window"])
def test_batch_rows_match_single_rows(model_name, method_name, layout, request):
    if (model_name, method_name, layout) == ("qwen2_gqa7", "laq", "kv_head"):
        # Seen 2026-12-02 on a fresh CI machine (it passes on others): one kept token of row 1 differs between batch
        # and alone (layer 0 head 0: 15 vs 13) while the first-token logits agree within 1e-4. Diagnosed 2026-12-03:
        # not the lookahead tokens (their smallest top-1/top-2 logit margin is 0.011); the stage-2 budget boundary of
        # that layer and head lies on a plateau of three max-pooled scores (positions 13, 14, 15, equal to the last
        # bit alone), and batch and alone scores differ by up to 9e-8, so a last-bit difference of the machine's
        # float kernels decides which plateau token is kept. A tie, not a batching bug.
        request.applymarker(pytest.mark.xfail(reason="a score tie at LAQ's budget boundary, tiny Qwen2"))
    model = build_tiny(model_name)
    prompts = [random_prompt(n, 10 + n) for n in ROWS]
    method = make(method_name, layout=layout)
    batch = compress(model, TOK, prompts, method)
    singles = [compress(model, TOK, [p], method) for p in prompts]
    for b, single in enumerate(singles):
        diff = max_diff(batch.first_logits[b], single.first_logits[0])
        assert diff < 1e-4, f"row {b}: first-token logits differ from the row alone by {diff}"
        for i in range(model.config.num_hidden_layers):
            got, want = kept_sets(batch, i, b), kept_sets(single, i, 0)
            for h, (g, w) in enumerate(zip(got, want)):
                assert g == w, f"row {b} layer {i} head {h}: batch-only {sorted(g - w)}, alone-only {sorted(w - g)}"
            # and the cached entries themselves (a kept pad would carry a pad's key, not the real token's)
            h_c = batch.cache.layers[i].keys.shape[1]
            valid = batch.state.tracks[i].valid[b].expand(h_c, -1)
            for h in range(h_c):
                for name in ("keys", "values"):
                    got_kv = getattr(batch.cache.layers[i], name)[b, h][valid[h]]
                    want_kv = getattr(single.cache.layers[i], name)[0, h][
                        single.state.tracks[i].valid[0].expand(h_c, -1)[h]
                    ]
                    diff = max_diff(got_kv, want_kv)
                    assert diff < 1e-4, f"row {b} layer {i} head {h}: cached {name} differ from the row alone by {diff}"
    # a few decode steps, teacher-forced with each row's own greedy tokens
    steps = [greedy_decode(s, s.first_logits, 3, set())[0] for s in singles]
    singles = [compress(model, TOK, [p], method) for p in prompts]  # fresh caches (decoding appended to them)
    for t in range(3):
        got = append(batch, [[s[t]] for s in steps])
        for b, single in enumerate(singles):
            want = append(single, [[steps[b][t]]])[0]
            diff = max_diff(got[b], want)
            assert diff < 1e-4, f"row {b}, decode step {t}: logits differ from the row alone by {diff}"


@pytest.mark.parametrize("method_name", METHODS)
def test_batch_greedy_tokens_match_single_rows(method_name):
    model = build_tiny("qwen2")
    prompts = [random_prompt(n, 20 + n) for n in ROWS]
    method = make(method_name)
    batch = compress(model, TOK, prompts, method)
    got = greedy_decode(batch, batch.first_logits, 6, set())
    for b, p in enumerate(prompts):
        single = compress(model, TOK, [p], method)
        want = greedy_decode(single, single.first_logits, 6, set())[0]
        assert got[b] == want, f"row {b}: batch tokens {got[b]} != alone {want}"
