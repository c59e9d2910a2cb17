"""LAQ / LAQ++: the lookahead runs at positions L..L+n-1 on a SnapKV stage-1 cache, leaves no lookahead KV behind,
and the stage-2 selection equals a reference computed with plain transformers (no dapq hook) and the spec's math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dapq import SnapKV, get_method
from dapq.engine import CompressedCache, compress
from helpers import TinyTokenizer, build_tiny, cache_from_tensors, capture_qk, random_prompt

TOK = TinyTokenizer()
L, BUDGET, WINDOW, N_LOOK = 48, 16, 4, 5


def _laq(name: str, **extra):
    return get_method(name, budget=BUDGET, stage1_window=WINDOW, n_lookahead=N_LOOK, **extra)


@pytest.mark.parametrize("name", ["laq", "laq++"])
def test_lookahead_positions_and_nothing_left_behind(name, monkeypatch):
    model = build_tiny("llama")
    prompts = [random_prompt(L, 1), random_prompt(L - 9, 2)]
    seen: list[torch.Tensor] = []
    real_forward = CompressedCache.forward

    def spy(cc, ids, pos, valid):
        seen.append(pos.clone())
        return real_forward(cc, ids, pos, valid)

    monkeypatch.setattr(CompressedCache, "forward", spy)
    cc = compress(model, TOK, prompts, _laq(name))
    lengths = torch.tensor([len(p) for p in prompts])
    got = torch.cat(seen, dim=1)  # [B, n]
    want = lengths[:, None] + torch.arange(N_LOOK)[None, :]
    assert torch.equal(got, want), f"lookahead positions {got.tolist()} != {want.tolist()}"
    assert cc.next_pos.tolist() == lengths.tolist(), "decoding must restart at L after the lookahead"
    for i, layer in enumerate(cc.cache.layers):
        track = cc.state.tracks[i]
        assert layer.keys.shape[2] == BUDGET, f"layer {i}: cache length {layer.keys.shape[2]} != budget {BUDGET}"
        for b, n in enumerate(lengths.tolist()):
            kept = track.pos[b][track.valid[b]]
            assert int(kept.max()) < n, f"layer {i} row {b}: a lookahead entry (position >= {n}) survived"
            assert (track.valid[b].sum(-1) == BUDGET).all(), f"layer {i} row {b}: not exactly {BUDGET} kept"
    assert cc.stats["kv_bytes_peak"] > cc.stats["kv_bytes_full"], "LAQ's peak must exceed the full prompt cache"


@pytest.mark.parametrize("name", ["laq", "laq++"])
def test_stage2_matches_plain_transformers_reference(name):
    model = build_tiny("llama")
    prompt = random_prompt(L, 3)
    method = _laq(name)
    cc = compress(model, TOK, [prompt], method)

    # Reference, without dapq's hook: full prefill queries/keys, then the lookahead decoded with plain transformers on
    # the SnapKV stage-1 cache at explicit positions L.., capturing its queries.
    with capture_qk(model) as cap, torch.inference_mode():
        out = model(torch.tensor([prompt]))
    full = dict(cap)
    stage1 = compress(model, TOK, [prompt], SnapKV(budget=BUDGET, window=WINDOW))
    cache = cache_from_tensors(stage1.cache)
    token = int(out.logits[0, -1].argmax())
    look_q: dict[int, list[torch.Tensor]] = {i: [] for i in full}
    for step in range(N_LOOK):
        with capture_qk(model) as cap, torch.inference_mode():
            o = model(torch.tensor([[token]]), position_ids=torch.tensor([[L + step]]), past_key_values=cache)
        for i, (q, _, _) in cap.items():
            look_q[i].append(q)
        token = int(o.logits[0, -1].argmax())

    p = method.prompt_queries
    for i, (q_full, k_full, scaling) in full.items():
        lq = torch.cat(look_q[i], dim=2)  # [1, H_q, n, D]
        groups = q_full.shape[1] // k_full.shape[1]
        k = k_full.repeat_interleave(groups, dim=1).float()  # [1, H_q, L, D]
        s = torch.softmax(lq.float() @ k.transpose(-1, -2) * scaling, dim=-1).sum(2)  # [1, H_q, L]
        if p:
            qp = q_full[:, :, L - p :].float()
            logits = qp @ k.transpose(-1, -2) * scaling  # [1, H_q, p, L]
            causal = torch.arange(L)[None, :] <= torch.arange(L - p, L)[:, None]
            s = s + torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(2)
            s[..., L - p :] = 0.0
        s = F.max_pool1d(s, 7, 1, 3).reshape(1, k_full.shape[1], groups, L).mean(2)[0]  # [H_kv, L]
        if p:
            s[:, L - p :] = float("inf")
        for h in range(s.shape[0]):
            got = set(cc.state.tracks[i].pos[0, h].tolist())
            want = set(torch.topk(s[h], BUDGET).indices.tolist())
            kth = torch.topk(s[h], BUDGET).values[-1]
            ties = set(torch.nonzero(torch.isclose(s[h], kth, rtol=1e-4)).flatten().tolist())
            assert got - want <= ties and want - got <= ties, (
                f"layer {i} head {h}: kept {sorted(got)} vs reference {sorted(want)}"
            )


def test_laq_validation():
    from dapq import DapqError

    with pytest.raises(DapqError, match="stage1_window"):
        get_method("laq", budget=16)  # default window 32 does not fit
    with pytest.raises(DapqError, match="n_lookahead"):
        get_method("laq", budget=64, n_lookahead=0)
