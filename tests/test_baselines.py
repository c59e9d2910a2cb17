"""The baselines' defining properties on hand-made inputs (LayerInputs built directly, no model), and one end-to-end
check per baseline through `compress` on the tiny random Llama (cache lengths equal the per-layer budget).

PyramidKV: budgets decrease with depth and average to the budget within the floor error. H2O: equals a dense
float64 reference of column sums of causal attention. StreamingLLM: keeps exactly sinks + recent. LaCache: shifted
slices across consecutive layers, every middle token kept by some layer, exactly the budget on every layer.
"""

from __future__ import annotations

import pytest
import torch

from dapq import DapqError, LayerInputs, get_method
from dapq.engine import compress
from dapq.methods.h2o import H2O
from dapq.methods.lacache import LaCache, ladder_geometry, ladder_plan
from dapq.methods.protocols import layer_budget
from dapq.methods.pyramidkv import PyramidKV, pyramid_budgets
from dapq.methods.streaming_llm import StreamingLLM
from helpers import random_prompt


def make_inputs(
    lengths: list[int], budget: int, h_q: int = 4, h_c: int = 2, d: int = 8, layer_idx: int = 0, n_layers: int = 3
) -> LayerInputs:
    """Random rotated q/k for left-padded rows of the given real lengths (pads at position 0, as `compress` does)."""
    g = torch.Generator().manual_seed(sum(lengths) + layer_idx)
    t = max(lengths)
    pos = torch.zeros(len(lengths), t, dtype=torch.long)
    valid = torch.zeros(len(lengths), t, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pos[b, t - n :] = torch.arange(n)
        valid[b, t - n :] = True
    return LayerInputs(
        queries=torch.randn(len(lengths), h_q, t, d, generator=g) * 2,
        keys=torch.randn(len(lengths), h_c, t, d, generator=g) * 2,
        positions=pos,
        valid=valid,
        budgets=torch.tensor([min(budget, n) for n in lengths]),
        prompt_len=t,
        scaling=d**-0.5,
        layer_idx=layer_idx,
        n_layers=n_layers,
    )


def kept_real(inp: LayerInputs, method) -> list[list[set[int]]]:
    """Per row and cache head: the kept tokens as indices among the row's real tokens."""
    idx, ok = method.select(inp, inp.budgets)
    pad = (~inp.valid[:, : inp.prompt_len]).sum(-1)
    return [[{int(i) - int(pad[b]) for i in idx[b, h][ok[b, h]]} for h in range(idx.shape[1])] for b in range(len(idx))]


# ---------------------------------------------------------------------------------------------------- PyramidKV
def test_pyramid_schedule_by_hand():
    # B - W = 96: min = 96 // 20 = 4, max = 192 - 4 = 188, step = 184 // 31 = 5; layer l keeps 188 - 5 l + 32
    assert pyramid_budgets(128, 32, 20, 32, 4096) == [220 - 5 * layer for layer in range(32)]
    # max (188) >= L - W (168): max = 168, min = 192 - 168 = 24, step = 144 // 31 = 4; layer 0 keeps all of L
    assert pyramid_budgets(128, 32, 20, 32, 200) == [200 - 4 * layer for layer in range(32)]
    assert pyramid_budgets(128, 32, 20, 32, 100) == [100] * 32  # L <= B: nothing evicted
    assert pyramid_budgets(128, 32, 20, 1, 4096) == [128]  # one layer: no pyramid


@pytest.mark.parametrize("n_layers", [2, 3, 24, 32, 40])
@pytest.mark.parametrize("budget,window", [(64, 8), (128, 32), (512, 32), (2048, 32), (33, 32)])
@pytest.mark.parametrize("prompt_len", [100, 300, 1000, 5000])
def test_pyramid_budgets_decrease_and_average_to_budget(n_layers, budget, window, prompt_len):
    if prompt_len <= budget:
        return
    got = pyramid_budgets(budget, window, 20, n_layers, prompt_len)
    assert len(got) == n_layers
    assert all(a >= b for a, b in zip(got, got[1:])), f"not decreasing with depth: {got}"
    assert all(window <= k <= prompt_len for k in got), f"outside [W, L]: {got}"
    excess = sum(got) / n_layers - budget
    assert 0 <= excess < (n_layers - 1) / 2, f"mean {sum(got) / n_layers} vs budget {budget}: beyond the floor error"


def test_pyramid_layer_budget_drives_selection():
    method = PyramidKV(budget=16, window=4)
    n_layers, n = 4, 60
    want = pyramid_budgets(16, 4, 20, n_layers, n)
    assert want[0] > want[-1]
    for layer in range(n_layers):
        k = layer_budget(method, method.token_budget(n), layer, n_layers, n)
        assert k == want[layer]
        inp = make_inputs([n, 45], k, layer_idx=layer, n_layers=n_layers)
        for b, row in enumerate(kept_real(inp, method)):
            n_row = (n, 45)[b]
            for kept in row:
                assert len(kept) == min(k, n_row)
                assert set(range(n_row - 4, n_row)) <= kept, "the window must be kept"


# ---------------------------------------------------------------------------------------------------- H2O
def dense_h2o_scores(inp: LayerInputs, recent: int, gqa: str = "mean") -> torch.Tensor:  # [B, H_c, T] float64
    """Full L x L causal attention in float64, one row and head at a time, column sums, GQA, forced recent."""
    b_n, h_q, t, _ = inp.queries.shape
    h_c = inp.keys.shape[1]
    out = torch.zeros(b_n, h_q, t, dtype=torch.float64)
    for b in range(b_n):
        real = inp.valid[b].nonzero().flatten()  # left padding: the real tokens are the last n
        q, k = inp.queries[b][:, real].double(), inp.keys[b][:, real].double()
        n = len(real)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for h in range(h_q):
            logits = (q[h] @ k[h // (h_q // h_c)].T) * inp.scaling
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            out[b, h, real] = probs.sum(0)
    grouped = out.reshape(b_n, h_c, h_q // h_c, t)
    s = grouped.mean(2) if gqa == "mean" else grouped.amax(2)
    for b in range(b_n):
        r = min(recent, int(inp.budgets[b]))
        s[b, :, t - r :] = float("inf")
    return s.masked_fill(~inp.valid[:, None, :], float("-inf"))


@pytest.mark.parametrize("block_size", [1, 3, 7, 256])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_h2o_equals_dense_reference(block_size, gqa):
    inp = make_inputs([17, 11, 14], budget=8)
    method = H2O(budget=8, recent=3, block_size=block_size, gqa=gqa)
    got = method.scores(inp).double()
    want = dense_h2o_scores(inp, recent=3, gqa=gqa)
    assert torch.equal(torch.isinf(got) & (got > 0), torch.isinf(want) & (want > 0)), "forced-recent tokens differ"
    assert torch.equal(torch.isinf(got) & (got < 0), torch.isinf(want) & (want < 0)), "pads differ"
    finite = ~torch.isinf(want)
    diff = float((got[finite] - want[finite]).abs().max())
    assert diff < 1e-5, f"blocked column sums differ from the dense reference by {diff}"
    # the kept set: the 3 recent tokens plus the top 5 heavy hitters of the dense scores
    idx, ok = method.select(inp, inp.budgets)
    for b in range(3):
        for h in range(2):
            top = torch.sort(want[b, h], descending=True, stable=True).indices[:8]
            assert set(idx[b, h][ok[b, h]].tolist()) == set(top.tolist())


def test_h2o_column_sums_are_a_distribution_per_query():
    # every real query's attention sums to 1, so the column sums of a row sum to its number of real tokens
    inp = make_inputs([9, 6], budget=4)
    method = H2O(budget=4, recent=0, block_size=4, gqa="mean")
    s = method.query_head_scores(inp)  # [B, H_q, T]
    assert torch.allclose(s.sum(-1), torch.tensor([[9.0] * 4, [6.0] * 4]), atol=1e-5)
    assert float(s[1, :, :3].abs().max()) == 0.0, "pads must get no attention"


def test_h2o_recent_must_fit_the_budget():
    with pytest.raises(DapqError, match="recent"):
        H2O(budget=16)
    assert H2O(budget=0.1).recent == 32  # a ratio budget: recent is capped per row at run time


# ---------------------------------------------------------------------------------------------------- StreamingLLM
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_streaming_keeps_exactly_sinks_and_recent(sinks):
    lengths, budget = [20, 13, 9], 10
    inp = make_inputs(lengths, budget)
    for n, row in zip(lengths, kept_real(inp, StreamingLLM(budget=budget, sinks=sinks))):
        k = min(budget, n)
        want = set(range(n)) if k == n else set(range(sinks)) | set(range(n - (k - sinks), n))
        assert all(kept == want for kept in row), f"L={n}: {sorted(row[0])} != {sorted(want)}"


def test_streaming_sinks_must_fit_the_budget():
    with pytest.raises(DapqError, match="sinks"):
        StreamingLLM(budget=4)


@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_streaming_rerotate_moves_kept_keys_to_contiguous_positions(layout):
    """Layer-0 keys depend only on the token and its position, so after re-rotation they must equal a plain
    transformers forward of the kept tokens as a fresh sequence at positions 0..B-1; decoding continues at B."""
    from dapq.engine import compress, greedy_decode
    from helpers import TinyTokenizer, build_tiny, capture_qk

    model = build_tiny("llama")
    prompts = [random_prompt(40, 11), random_prompt(29, 12)]
    budget, sinks = 12, 4
    cc = compress(
        model, TinyTokenizer(), prompts, StreamingLLM(budget=budget, sinks=sinks, rerotate=True, layout=layout)
    )
    assert cc.next_pos.tolist() == [budget, budget], f"decoding must continue at B={budget}: {cc.next_pos.tolist()}"
    for b, prompt in enumerate(prompts):
        kept_ids = prompt[:sinks] + prompt[len(prompt) - (budget - sinks) :]
        with capture_qk(model) as cap, torch.inference_mode():
            model(torch.tensor([kept_ids]))
        ref_keys = cap[0][1]  # [1, H_kv, B, D]
        groups = cc.cache.layers[0].keys.shape[1] // ref_keys.shape[1]
        got = cc.cache.layers[0].keys[b : b + 1]  # [1, H_c, B, D]
        want = ref_keys.repeat_interleave(groups, dim=1)
        diff = float((got - want).abs().max())
        assert diff < 1e-5, f"row {b}: re-rotated layer-0 keys differ from a fresh forward by {diff}"
        assert cc.state.tracks[0].pos[b, 0].tolist() == list(range(budget)), "tracked positions must be 0..B-1"
    tokens = greedy_decode(cc, cc.first_logits, 4, set())
    assert all(len(t) == 4 for t in tokens)
    assert cc.state.tracks[0].pos[0, 0, -3:].tolist() == [budget, budget + 1, budget + 2], "decode positions"


# ---------------------------------------------------------------------------------------------------- LaCache
def test_lacache_ladder_by_hand():
    # 3 layers, span 1, overlap 0: blocks of b = 1 + ceil(2 / 1) = 3, each layer keeps a = 1 token per block at
    # offset l mod 3. L = 30, B = 20, 2 sinks: D = 10 dropped = 5 blocks of 3 after the sinks, then the tail 17..29.
    assert ladder_geometry(3, 1, 0) == (3, 1)
    plan = ladder_plan(30, 20, 3, 1, 0, 2)
    tail = list(range(17, 30))
    assert plan.kept(0, 30) == [0, 1, 2, 5, 8, 11, 14, *tail]
    assert plan.kept(1, 30) == [0, 1, 3, 6, 9, 12, 15, *tail]
    assert plan.kept(2, 30) == [0, 1, 4, 7, 10, 13, 16, *tail]
    # and the tensor implementation agrees, on a left-padded batch, for every head
    method = LaCache(budget=20, span=1, sinks=2)
    for layer in range(3):
        inp = make_inputs([30, 24], 20, layer_idx=layer, n_layers=3)
        rows = kept_real(inp, method)
        assert all(kept == set(plan.kept(layer, 30)) for kept in rows[0])
        assert all(kept == set(ladder_plan(24, 20, 3, 1, 0, 2).kept(layer, 24)) for kept in rows[1])


def test_lacache_overlap_gives_overlapping_shifted_slices():
    # 8 layers, span 4, overlap 2: b = 1 + ceil(4 / 2) = 3, a = min(ceil(4 / 2), 3) = 2, offsets l mod 2
    assert ladder_geometry(8, 4, 2) == (3, 2)
    plan = ladder_plan(100, 80, 8, 4, 2, 4)
    assert (plan.block, plan.keep, plan.blocks, plan.partial) == (3, 2, 20, 0)  # D = 20: 20 blocks dropping 1 each
    ladder0 = sorted(set(plan.kept(0, 100)[4:]) - set(range(plan.tail_start, 100)))
    ladder1 = sorted(set(plan.kept(1, 100)[4:]) - set(range(plan.tail_start, 100)))
    assert ladder0[:4] == [4, 5, 7, 8] and ladder1[:4] == [5, 6, 8, 9]


@pytest.mark.parametrize(
    "n_layers,span,overlap", [(3, 1, 0), (3, 2, 0), (8, 4, 2), (32, 16, 0), (32, 8, 0), (28, 16, 4)]
)
@pytest.mark.parametrize("n,budget,sinks", [(30, 20, 2), (300, 128, 4), (1000, 256, 4), (1000, 600, 64)])
def test_lacache_exact_budget_shifted_slices_full_coverage(n_layers, span, overlap, n, budget, sinks):
    plan = ladder_plan(n, budget, n_layers, span, overlap, sinks)
    kept = [plan.kept(layer, n) for layer in range(n_layers)]
    for layer, k in enumerate(kept):
        assert len(k) == len(set(k)) == budget and 0 <= min(k) and max(k) < n, f"layer {layer}: {len(set(k))} kept"
        assert set(range(sinks)) <= set(k) and set(range(plan.tail_start, n)) <= set(k)
    assert n - plan.tail_start >= min(n_layers, budget - sinks), "the recent tail keeps at least n_layers tokens"
    if plan.blocks:  # consecutive layers keep shifted slices of each full block (offset l mod (b - a + 1))
        period = plan.block - plan.keep + 1
        ladder = [sorted(set(k) - set(range(sinks)) - set(range(plan.tail_start, n))) for k in kept]
        for layer in range(n_layers - 1):
            if (layer + 1) % period:
                assert [i + 1 for i in ladder[layer][: plan.blocks]] == ladder[layer + 1][: plan.blocks]
    if not (plan.blocks or plan.partial):  # no ladder (c = 0 or no room): sinks + recent on every layer
        assert all(k == [*range(sinks), *range(n - budget + sinks, n)] for k in kept)
    elif plan.block - plan.keep <= n_layers - 1:  # offsets reach every slot: each middle token is kept somewhere
        assert set().union(*map(set, kept)) == set(range(n)), "a middle token is kept by no layer"


def test_lacache_without_ladder_is_sinks_plus_recent():
    # the tiny model's 3 layers with the default span 16: b = 1, no ladder
    assert ladder_geometry(3, 16, 0) == (1, 1)
    assert ladder_plan(40, 12, 3, 16, 0, 4).kept(1, 40) == [0, 1, 2, 3, *range(32, 40)]


def test_lacache_parameters_are_validated():
    with pytest.raises(DapqError, match="overlap"):
        LaCache(budget=64, span=4, overlap=4)
    with pytest.raises(DapqError, match="sinks"):
        LaCache(budget=4, sinks=4)


# ---------------------------------------------------------------------------------------------------- end to end
L = 40


def expected_positions(name: str, method, layer: int, n_layers: int, n: int) -> set[int] | None:
    k = min(layer_budget(method, method.token_budget(n), layer, n_layers, n), n)
    if name == "streamingllm":
        return set(range(method.sinks)) | set(range(n - (k - method.sinks), n))
    if name == "lacache":
        return set(ladder_plan(n, k, n_layers, method.span, method.overlap, method.sinks).kept(layer, n))
    return None


@pytest.mark.parametrize(
    "name,params",
    [
        ("pyramidkv", {"window": 4, "budget": 12}),
        ("h2o", {"recent": 4, "budget": 12}),
        ("streamingllm", {"budget": 12}),
        ("lacache", {"budget": 16, "span": 1, "sinks": 2}),
        ("lacache", {"budget": 12}),
    ],
    ids=["pyramidkv", "h2o", "streamingllm", "lacache-span1", "lacache-default"],
)
@pytest.mark.parametrize("layout", ["kv_head", "query_head"])
def test_compress_keeps_the_layer_budget(llama, tok, name, params, layout):
    method = get_method(name, layout=layout, **params)
    n_layers = llama.config.num_hidden_layers
    lengths = [L, 29]
    cc = compress(llama, tok, [random_prompt(n, 50 + n) for n in lengths], method)
    h_c = llama.config.num_attention_heads if layout == "query_head" else llama.config.num_key_value_heads
    budgets = [
        [min(layer_budget(method, method.token_budget(n), i, n_layers, n), n) for n in lengths] for i in range(3)
    ]
    if name == "pyramidkv":
        assert budgets[0][0] > budgets[-1][0], "the pyramid must decrease with depth"
        assert [b[0] for b in budgets] == pyramid_budgets(12, 4, 20, n_layers, L)
    for i, (layer, track) in enumerate(zip(cc.cache.layers, cc.state.tracks)):
        assert tuple(layer.keys.shape[:3]) == (2, h_c, max(budgets[i])), f"layer {i}: {tuple(layer.keys.shape)}"
        valid = track.valid.expand(2, h_c, -1)
        pos = track.pos.expand(2, h_c, -1)
        for b, n in enumerate(lengths):
            assert valid[b].sum(-1).tolist() == [budgets[i][b]] * h_c, f"layer {i} row {b}"
            want = expected_positions(name, method, i, n_layers, n)
            for h in range(h_c):
                got = set(pos[b, h][valid[b, h]].tolist())
                assert len(got) == budgets[i][b] and max(got) < n
                if want is not None:
                    assert got == want, f"layer {i} row {b} head {h}: {sorted(got)} != {sorted(want)}"
        assert cc.state.kept[i] == pytest.approx(sum(budgets[i]) / 2)
