"""LAQ's reference-code switches (`stop_at_eos`, `stage2_mask="reference"`, `accumulate="fp16"`) and the
`laq_reference` / `laq++_reference` presets: each switch's defining property against a direct computation, and the
stop at end-of-sequence through the serving path, batches and the harness's batched lookahead."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dapq.engine.stages as stages
from dapq import DapqError, get_method
from dapq.engine import compress, derive, derive_many, record
from dapq.methods import LAQ, StageOneObservation
from dapq.methods.scoring import window_attention
from helpers import TinyTokenizer, build_tiny, random_prompt

N = 6  # lookahead tokens of the engine tests


# ---------------------------------------------------------------------------------------------- fields and presets
def test_presets_set_the_four_switches_and_laq_defaults_are_unchanged():
    base = get_method("laq", budget=64)
    assert (base.stop_at_eos, base.stage2_mask, base.accumulate, base.layout) == (False, "none", "fp32", "kv_head")
    for name, p in [("laq_reference", 0), ("laq++_reference", 8)]:
        m = get_method(name, budget=64)
        assert isinstance(m, LAQ) and m.lookahead_stops_at_eos
        assert (m.stop_at_eos, m.stage2_mask, m.accumulate, m.layout) == (True, "reference", "fp16", "query_head")
        assert m.prompt_queries == p and m.n_lookahead == 8
    assert not base.lookahead_stops_at_eos


@pytest.mark.parametrize(
    "params, match",
    [({"stage2_mask": "causal"}, "stage2_mask"), ({"accumulate": "bf16"}, "accumulate"), ({"stop_at_eos": 1}, "bool")],
)
def test_bad_switch_values_are_dapq_errors(params, match):
    with pytest.raises(DapqError, match=match):
        get_method("laq", budget=64, **params)


def test_lookahead_valid_follows_the_reference_loop():
    """Token 0 (the prefill's argmax) is always fed, even when it is a stop token; a predicted stop token is not fed,
    so query k counts while none of tokens 1..k is a stop id; the last of the n + 1 tokens is never fed."""
    tokens = [[5, 2, 7, 9], [2, 5, 5, 2], [5, 6, 2, 9]]
    got = stages.lookahead_valid(tokens, 3, {2}, "cpu")
    assert got.tolist() == [[True, False, False], [True, True, True], [True, True, False]]


def test_stop_at_eos_needs_the_tokenizer():
    with pytest.raises(DapqError, match="tokenizer"):
        stages.lookahead_stop_ids(get_method("laq_reference", budget=64), None)
    assert stages.lookahead_stop_ids(get_method("laq", budget=64), None) is None
    assert stages.lookahead_stop_ids(get_method("laq_reference", budget=64), TinyTokenizer()) == {0, 2}


# ---------------------------------------------------------------------------------------------- stage-2 math
B, H, T, D, SCALING = 2, 4, 20, 8, 0.35
LENGTHS = [20, 15]  # row 1 is left-padded by 5


def _inputs(n: int, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    look = torch.randn(B, H, n, D, generator=g)
    keys = torch.randn(B, H, T, D, generator=g)  # query_head layout: one key set per query head
    valid = torch.zeros(B, T, dtype=torch.bool)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, n_real in enumerate(LENGTHS):
        valid[b, T - n_real :] = True
        positions[b, T - n_real :] = torch.arange(n_real)
    extra = {"prompt_queries": None, "prompt_query_pos": None}
    if p:
        extra = {"prompt_queries": torch.randn(B, H, p, D, generator=g), "prompt_query_pos": positions[:, T - p :]}
    obs = StageOneObservation(
        torch.zeros(B, H, 1, dtype=torch.long), valid[:, None, :1], torch.tensor([8, 8]), SCALING, extra
    )
    return look, keys, positions, valid, obs


def _hand_scores(look, keys, obs, used, mask, accumulate):  # [B, H, T] before pooling (pooling="none")
    """Loops over rows and window queries: window = the p prompt queries then the first used[b] lookahead queries;
    query j sees prompt positions <= L - w + j (reference mask) or its causal past (none)."""
    prompt_q = obs.extra["prompt_queries"]
    p = 0 if prompt_q is None else prompt_q.shape[2]
    out = torch.zeros(B, H, T)
    for b, n_real in enumerate(LENGTHS):
        pad, m = T - n_real, used[b]
        window = [prompt_q[b, :, i] for i in range(p)] + [look[b, :, i] for i in range(m)]  # each [H, D]
        w = p + m
        probs = []
        for j, q in enumerate(window):
            if mask == "reference":
                last = n_real - w + j
            else:
                last = n_real - p + j if j < p else n_real - 1
            logits = torch.einsum("hd,htd->ht", q, keys[b, :, pad:]) * SCALING  # [H, L]
            logits[:, last + 1 :] = float("-inf")
            probs.append(torch.softmax(logits, dim=-1))
        stacked = torch.stack(probs, dim=1)  # [H, w, L]
        out[b, :, pad:] = stacked.half().sum(dim=1).float() if accumulate == "fp16" else stacked.sum(dim=1)
    if p:
        out[..., T - p :] = 0.0
    return out


def _method(p: int, n: int, **switches) -> LAQ:
    return LAQ(
        budget=8, stage1_window=2, n_lookahead=n, prompt_queries=p, pooling="none", layout="query_head", **switches
    )


def _check(got, want, p, rtol, atol):
    assert torch.isneginf(got[1, :, : T - LENGTHS[1]]).all(), "pads must never be kept"
    if p:
        assert torch.isposinf(got[..., T - p :]).all(), "LAQ++ keeps its prompt-query tokens"
    finite = torch.isfinite(got)
    assert torch.allclose(got[finite], want[finite], rtol=rtol, atol=atol), float(
        (got[finite] - want[finite]).abs().max()
    )


@pytest.mark.parametrize("p", [0, 3])
def test_reference_mask_equals_hand_built_scores(p):
    n = 4
    look, keys, positions, valid, obs = _inputs(n, p)
    got = _method(p, n, stage2_mask="reference").stage2_scores(look, keys, positions, valid, obs)
    _check(got, _hand_scores(look, keys, obs, [n, n], "reference", "fp32"), p, 1e-5, 1e-6)
    plain = _method(p, n).stage2_scores(look, keys, positions, valid, obs)
    _check(plain, _hand_scores(look, keys, obs, [n, n], "none", "fp32"), p, 1e-5, 1e-6)
    finite = torch.isfinite(got)
    assert not torch.allclose(got[finite], plain[finite]), "the reference mask must change the scores"
    if not p:  # the last prompt key is seen by the last lookahead query only
        last = window_attention(look[:, :, -1:], keys, valid[:, None, :], SCALING)[:, :, 0, -1]  # [B, H]
        assert torch.allclose(got[..., -1], last, rtol=1e-5)


@pytest.mark.parametrize("p", [0, 3])
def test_fp16_accumulation_sums_the_half_cast_probabilities(p):
    n = 4
    look, keys, positions, valid, obs = _inputs(n, p, seed=1)
    got = _method(p, n, accumulate="fp16").stage2_scores(look, keys, positions, valid, obs)
    finite = torch.isfinite(got)
    assert torch.equal(got[finite], got[finite].half().float()), "fp16 sums are fp16 values"
    _check(got, _hand_scores(look, keys, obs, [n, n], "none", "fp16"), p, 2e-3, 1e-4)
    # exactly probs.half().sum over the window of the same fp32 probabilities (prompt queries first)
    probs = window_attention(look, keys, valid[:, None, :].expand(-1, n, -1), SCALING)  # [B, H, n, T]
    if p:
        q_pos = obs.extra["prompt_query_pos"]
        pvis = valid[:, None, :] & (positions[:, None, :] <= q_pos[:, :, None])
        probs = torch.cat([window_attention(obs.extra["prompt_queries"], keys, pvis, SCALING), probs], dim=2)
    want = probs.half().sum(dim=2).float()
    if p:
        want[..., T - p :] = 0.0
    assert torch.equal(got[finite], want[finite])
    fp32 = _method(p, n).stage2_scores(look, keys, positions, valid, obs)
    assert not torch.equal(fp32[finite], fp32[finite].half().float()), "the fp32 default is not rounded to fp16"


@pytest.mark.parametrize("p", [0, 3])
@pytest.mark.parametrize("switches", [{}, {"stage2_mask": "reference", "accumulate": "fp16"}])
def test_lookahead_valid_uses_only_the_queries_before_the_stop(p, switches):
    """Row 0 stops after 2 queries, row 1 uses all 4: each row equals its scores from its used queries alone (the
    reference mask then counts w = p + used), and the hand-built reference."""
    n, used = 4, [2, 4]
    look, keys, positions, valid, obs = _inputs(n, p, seed=2)
    method = _method(p, n, stop_at_eos=True, **switches)
    lookahead_valid = torch.arange(n)[None, :] < torch.tensor(used)[:, None]  # [B, n]
    got = method.stage2_scores(look, keys, positions, valid, obs, lookahead_valid)
    fp16 = switches.get("accumulate") == "fp16"
    for b in range(B):
        extra = {k: v[b : b + 1] if v is not None else None for k, v in obs.extra.items()}
        row_obs = dataclasses.replace(obs, extra=extra)
        alone = method.stage2_scores(
            look[b : b + 1, :, : used[b]], keys[b : b + 1], positions[b : b + 1], valid[b : b + 1], row_obs
        )
        finite = torch.isfinite(alone[0])
        assert torch.equal(torch.isfinite(got[b]), finite)
        assert torch.allclose(got[b][finite], alone[0][finite], rtol=1e-3 if fp16 else 1e-6, atol=1e-6)
    want = _hand_scores(look, keys, obs, used, switches.get("stage2_mask", "none"), "fp16" if fp16 else "fp32")
    _check(got, want, p, 2e-3 if fp16 else 1e-5, 1e-4 if fp16 else 1e-6)


# ---------------------------------------------------------------------------------------------- through the engine
class StopTokenizer(TinyTokenizer):
    """TinyTokenizer whose end-of-sequence id (and optionally a chat end-of-turn token) is chosen by the test."""

    def __init__(self, eos: int, end_of_turn: int | None = None) -> None:
        self.eos_token_id = eos
        self.end_of_turn = end_of_turn

    def get_vocab(self) -> dict[str, int]:
        vocab = super().get_vocab()
        if self.end_of_turn is not None:
            vocab["<|im_end|>"] = self.end_of_turn
        return vocab


def _spy(monkeypatch) -> tuple[list, list]:
    """Record the lookahead's greedy tokens and the lookahead_valid stage 2 receives."""
    tokens: list = []
    valids: list = []
    real_decode, real_valid = stages.greedy_decode, stages.lookahead_valid

    def decode(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        tokens.append(out)
        return out

    def valid(*args, **kwargs):
        out = real_valid(*args, **kwargs)
        valids.append(out)
        return out

    monkeypatch.setattr(stages, "greedy_decode", decode)
    monkeypatch.setattr(stages, "lookahead_valid", valid)
    return tokens, valids


def _first_stop(tokens: list[int], stops: set[int]) -> int:
    return next((k for k in range(1, N) if tokens[k] in stops), N)


def _kept(cc, row: int) -> list[list[set[int]]]:
    """Per layer, per head: the kept prompt positions of `row`."""
    out = []
    for track in cc.state.tracks:
        pos, valid = track.pos[row], track.valid[row]
        out.append([set(pos[h][valid[h]].tolist()) for h in range(valid.shape[0])])
    return out


def _laq(name: str, **extra):
    params = {"budget": 16, "stage1_window": 4, "n_lookahead": N, **({"prompt_queries": 4} if "++" in name else {})}
    return get_method(name, **{**params, **extra})


@pytest.mark.parametrize("name", ["laq_reference", "laq++_reference"])
def test_stop_at_eos_equals_a_lookahead_of_the_steps_before_the_stop(name, monkeypatch):
    """With the stop token chosen as the argmax of lookahead step k, the stop run uses queries 0..k-1 and selects
    exactly as a run with n_lookahead=k (same tokens, same stage-1 cache, w = p + k), and not as the full run."""
    model = build_tiny("llama")
    prompt = random_prompt(48, 0)
    tokens, valids = _spy(monkeypatch)
    full = compress(model, TinyTokenizer(), [prompt], _laq(name, stop_at_eos=False))
    look = tokens[-1][0]
    k = next((k for k in range(2, N) if look[k] not in {0, *look[1:k]}), None)
    assert k is not None, f"no usable stop step in the lookahead tokens {look}"
    tok = StopTokenizer(eos=look[k])
    stopped = compress(model, tok, [prompt], _laq(name))
    assert valids[-1].tolist() == [[i < k for i in range(N)]]
    short = compress(model, tok, [prompt], _laq(name, stop_at_eos=False, n_lookahead=k))
    assert _kept(stopped, 0) == _kept(short, 0)
    assert _kept(stopped, 0) != _kept(full, 0), "the stop must change the selection (else the test proves nothing)"
    assert stopped.next_pos.tolist() == [48]


def _two_stops(look_a: list[int], look_b: list[int]) -> tuple[int, int, int, int]:
    for ka in range(2, N):
        for kb in range(1, N):
            stops = {0, look_a[ka], look_b[kb]}
            if ka != kb and _first_stop(look_a, stops) == ka and _first_stop(look_b, stops) == kb:
                return look_a[ka], look_b[kb], ka, kb
    raise AssertionError(f"no pair of stop tokens stops {look_a} and {look_b} at different steps")


def test_batch_rows_with_different_stops_equal_their_runs_alone(monkeypatch):
    model = build_tiny("llama")
    prompts = [random_prompt(48, 0), random_prompt(40, 4)]
    tokens, valids = _spy(monkeypatch)
    looks = []
    for prompt in prompts:
        compress(model, TinyTokenizer(), [prompt], _laq("laq_reference", stop_at_eos=False))
        looks.append(tokens[-1][0])
    eos, end_of_turn, ka, kb = _two_stops(*looks)
    tok = StopTokenizer(eos, end_of_turn)
    method = _laq("laq_reference")
    batch = compress(model, tok, prompts, method)
    assert valids[-1].tolist() == [[i < ka for i in range(N)], [i < kb for i in range(N)]]
    for row, prompt in enumerate(prompts):
        alone = compress(model, tok, [prompt], method)
        assert _kept(batch, row) == _kept(alone, 0), f"row {row}: the batch selects otherwise than the row alone"

    # the harness: derive (one lookahead per budget) and derive_many's batched lookahead agree with the serving path
    rec = record(model, tok, prompts)
    methods = [dataclasses.replace(method, budget=b) for b in (12, 16)] + [_laq("laq++_reference", budget=20)]
    batched = derive_many(rec, methods, batch_lookahead=True)
    for m, got in zip(methods, batched):
        want = derive(rec, m)
        served = compress(model, tok, prompts, m)
        for row in range(len(prompts)):
            assert _kept(got, row) == _kept(want, row) == _kept(served, row), f"{m.describe()} row {row}"
