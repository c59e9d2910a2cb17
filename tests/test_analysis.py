"""The analysis suite: captured queries against plain forward passes, each quantity against a direct computation,
the paper's invariants (SC&SP = 1, DC&SP pre = post, oracle recall = 1), figures and the resumable command."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from dapq.analysis import quantities as qt
from dapq.analysis.recall import analyse_prompt, run_windows, streaming_keep
from dapq.analysis.similarity import fixed_ids, offset_curve, reference, run_similarity, table1
from dapq.errors import DapqError
from dapq.hf.capture import capture_queries, greedy_answer, prefill_prompt, queries_at, to_pre_rope
from helpers import TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()


def _reference_queries(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre- and post-RoPE queries of a plain forward, from q_proj outputs and the model file's own RoPE."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o))
        for k, layer in enumerate(model.model.layers)
    ]
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        model(input_ids=x, position_ids=pos)
        cos, sin = model.model.rotary_emb(torch.zeros(1), pos)
    for h in hooks:
        h.remove()
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre = [outs[k][0].view(len(ids), -1, d).transpose(0, 1) for k in range(len(outs))]  # [H_q, T, D]
    post = [module.apply_rotary_pos_emb(q[None], q[None], cos, sin)[0][0] for q in pre]
    return pre, post


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_captured_queries_equal_a_plain_forward(arch):
    model = build_tiny(arch)
    prompt = random_prompt(30, 1)
    state = prefill_prompt(model, prompt, keep_last=5)
    answer = greedy_answer(model, state, 6, set())
    assert state.cache.layers[0].keys.shape[2] == 30, "greedy_answer must leave the prompt cache as it was"
    got = queries_at(model, state, answer, range(30, 36))
    pre_ref, post_ref = _reference_queries(model, prompt + answer)
    pre_got = to_pre_rope(model, got.queries, got.positions)
    for i in range(len(post_ref)):
        torch.testing.assert_close(got.queries[i], post_ref[i][:, 30:], msg=f"layer {i}: post-RoPE answer queries")
        torch.testing.assert_close(pre_got[i], pre_ref[i][:, 30:], msg=f"layer {i}: pre-RoPE answer queries")
        torch.testing.assert_close(state.prompt_queries[i], post_ref[i][:, 25:30], msg=f"layer {i}: prompt queries")
    plain = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(state.first_logits, plain.float(), msg="capturing must not change the model's output")


def test_queries_at_arbitrary_positions_see_the_whole_prompt():
    """Tokens fed at positions 0..n-1 after the prompt equal a plain forward of prompt + tokens with those ids."""
    model = build_tiny("qwen3")
    prompt, extra = random_prompt(25, 2), random_prompt(4, 3)
    state = prefill_prompt(model, prompt)
    got = queries_at(model, state, extra, range(0, 4))
    pos = torch.tensor([list(range(25)) + [0, 1, 2, 3]])
    with capture_queries(model) as rec, torch.no_grad():
        model(input_ids=torch.tensor([prompt + extra]), position_ids=pos)
    for i, qs in enumerate(rec.queries):
        torch.testing.assert_close(got.queries[i], qs[0][0, :, 25:], msg=f"layer {i}: cached path vs one forward")
    assert state.cache.layers[0].keys.shape[2] == 25, "queries_at must cut the cache back to the prompt"


def test_query_cosine_and_scores_against_direct_loops():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, 8, generator=g)  # [H_q, w, D]
    k = torch.randn(2, 10, 8, generator=g)  # [H_kv, L, D]
    b = torch.randn(4, 3, 8, generator=g)
    cos = qt.query_cosine(q, b)
    for h in range(4):
        for i in range(3):
            want = float(q[h, i] @ b[h, i] / (q[h, i].norm() * b[h, i].norm()))
            assert math.isclose(float(cos[h, i]), want, rel_tol=1e-5), f"cosine [{h},{i}]"
    scores = qt.window_scores(q, k, 0.5)
    for kv in range(2):
        rows = [torch.softmax(q[h, i] @ k[kv].T * 0.5, -1) for h in (2 * kv, 2 * kv + 1) for i in range(3)]
        want = torch.stack(rows).sum(0) / 2  # summed over queries, mean over the 2 query heads of the group
        torch.testing.assert_close(scores[kv], want, msg=f"window scores of KV head {kv}")
    dist = qt.attention_distribution(q, k, 0.5)
    torch.testing.assert_close(dist.sum(-1), torch.ones(4), msg="a distribution sums to 1")


def test_recall_by_hand():
    gold = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    pred = torch.tensor([[4, 3, 9, 0], [8, 1, 2, 3]])
    torch.testing.assert_close(qt.recall(gold, pred), torch.tensor([0.5, 0.25]), msg="|gold ∩ pred| / |gold|")
    keep = streaming_keep(10, 4, sinks=2)  # tokens 0, 1 and 8, 9
    assert keep.tolist() == [True, True] + [False] * 6 + [True, True], f"StreamingLLM keep set {keep.tolist()}"
    gold2 = torch.tensor([[0, 5, 9, 3]])
    torch.testing.assert_close(qt.keep_set_recall(gold2, keep), torch.tensor([0.5]), msg="keep-set recall")
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2]])
    assert qt.topk_indices(scores, 2).tolist() == [[1, 2]], "ties go to the earlier key"


def test_similarity_invariants():
    model = build_tiny("llama")
    ref = reference(model, TOK, random_prompt(40, 4), 8)
    assert len(ref.answer) == 8, f"the answer has exactly N tokens (stops suppressed); got {len(ref.answer)}"
    t = table1(model, TOK, ref)
    assert abs(t["SC&SP"]["post"] - 1) < 1e-5 and abs(t["SC&SP"]["pre"] - 1) < 1e-5, f"SC&SP must be 1: {t}"
    assert abs(t["DC&SP"]["post"] - t["DC&SP"]["pre"]) < 1e-5, f"same positions: RoPE cannot change cosines: {t}"
    assert abs(t["SC&DP"]["pre"] - t["SC&DP"]["post"]) > 1e-4, f"other positions must change post-RoPE only: {t}"
    curve = offset_curve(model, ref, 9, None)
    best = curve["start"][max(range(len(curve["start"])), key=lambda i: curve["cosine"][i])]
    assert best == 40, f"the offset curve must peak at the real position 40; peaked at {best}"
    assert fixed_ids(TOK, 5, "ab") == TOK.encode("ababa", add_special_tokens=False), "fixed content repeats"


def test_recall_and_attention_invariants():
    model = build_tiny("llama")
    prompt = random_prompt(60, 5)
    r = analyse_prompt(model, TOK, prompt, budget=16, windows=[1, 4, 8], contents=["auto", "Fix_C"], answer_tokens=8)
    assert abs(r["recall"]["oracle"][8] - 1) < 1e-6, f"the full real answer recalls its own gold set: {r['recall']}"
    assert abs(r["attention"]["oracle"][8] - 1) < 1e-5, "and has the same attention distribution"
    assert set(r["recall"]) == {"dapq[auto]", "dapq[Fix_C]", "snapkv", "oracle", "laq", "streamingllm"}
    for name, by_w in r["recall"].items():
        for w, v in by_w.items():
            assert 0 <= v <= 1, f"{name} w={w}: recall {v} outside [0, 1]"
    with pytest.raises(DapqError, match="budget"):
        analyse_prompt(model, TOK, prompt[:10], budget=16, windows=[1], contents=["auto"], answer_tokens=4)


def test_runs_resume_and_render(tmp_path):
    from dapq.analysis import recall as rmod
    from dapq.analysis import similarity as smod

    model = build_tiny("llama")
    prompts = [("a", random_prompt(50, 6)), ("b", random_prompt(50, 7))]
    saved = {}
    full = run_windows(
        model, TOK, prompts, budget=12, windows=[1, 4], contents=["auto"], answer_tokens=6, on_result=saved.__setitem__
    )
    assert set(saved) == {"a", "b"}, "every prompt is saved as it finishes"
    calls = []
    resumed = run_windows(
        model, TOK, prompts, budget=12, windows=[1, 4], contents=["auto"], answer_tokens=6, done=saved,
        on_result=lambda *a: calls.append(a),
    )  # fmt: skip
    assert calls == [], "nothing is recomputed when every prompt is done"
    assert json.dumps(resumed["recall"], sort_keys=True) == json.dumps(full["recall"], sort_keys=True)
    for kind in ("recall", "attention"):
        rmod.figure(full, kind, str(tmp_path / f"{kind}.png"))
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000, f"{kind} figure"
        assert "| snapkv |" in rmod.markdown(full, kind), f"{kind} table has the method rows"
    sim = run_similarity(model, TOK, prompts[:1], prompts[:1], n_tokens=4, trials=3, points=5)
    assert len(sim["distributions"]["DC&SP"]) == 3, "one value per trial"
    smod.figure(sim, str(tmp_path / "similarity.png"))
    assert (tmp_path / "similarity.png").stat().st_size > 1000, "similarity figure"
    assert "| DC&SP |" in smod.markdown(sim), "Table 1 rows"


def test_analyze_command_writes_files_and_resumes(tmp_path, monkeypatch, capsys):
    import dapq.models
    from dapq.cli import main

    model = build_tiny("llama")
    monkeypatch.setattr(dapq.models, "load_model", lambda *a, **k: (model, TOK))
    out = tmp_path / "rec"
    argv = ["analyze", "recall", "--length", "90", "--samples", "1", "--budget", "12", "--windows", "1,2"]
    argv += ["--contents", "auto", "--answer-tokens", "4", "--out", str(out)]
    assert main(argv) == 0, "analyze recall should succeed"
    for name in ("recall.json", "recall.md", "recall.png", "items.jsonl"):
        assert (out / name).exists(), f"{name} missing"
    data = json.loads((out / "recall.json").read_text())
    assert set(data["recall"]) >= {"snapkv", "oracle", "dapq[auto]"}, f"methods in the JSON: {list(data['recall'])}"
    assert main(argv) == 0, "a rerun should succeed"
    assert "resuming: 1 finished" in capsys.readouterr().out, "the rerun should resume from items.jsonl"
    assert len((out / "items.jsonl").read_text().splitlines()) == 1, "a resumed run must not duplicate items"
    assert main(["analyze", "recall", "--windows", "1,x", "--out", str(out)]) == 2, "bad --windows is a clear error"
    assert main(["analyze", "similarity", "--task", "nope", "--out", str(tmp_path / "s")]) == 2, "unknown task"
