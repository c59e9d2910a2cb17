"""`dapq bench`: each benchmark runs on a tiny model and writes well-formed results; memory accounting by hand."""

from __future__ import annotations

import json

import pytest
import torch

from dapq.bench import speed
from dapq.engine import compress
from dapq.methods.base import get_method
from helpers import TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()


@pytest.fixture()
def tiny_prompts(monkeypatch):
    monkeypatch.setattr(speed, "bench_prompt", lambda tok, length, seed=0: random_prompt(length, seed + 1))


def test_ttft_rows_and_overhead(tiny_prompts):
    model = build_tiny("llama")
    r = speed.bench_ttft(model, TOK, [40, 60], ["full", "dapq"], 16, repeats=2, warmup=1)
    assert set(r["rows"]) == {"transformers", "full", "dapq"}, f"rows: {list(r['rows'])}"
    for name, cells in r["rows"].items():
        assert sorted(cells) == [40, 60], f"{name}: one cell per length"
        for cell in cells.values():
            assert cell["ttft_s"] > 0 and len(cell["runs_s"]) == 2, f"{name}: median of 2 timed runs"
    dapq = r["rows"]["dapq"][60]
    want = 100 * (dapq["ttft_s"] / r["rows"]["full"][60]["ttft_s"] - 1)
    assert abs(dapq["vs_full_pct"] - want) < 1e-9, "overhead is relative to FullKV at the same length"
    assert dapq["min_s"] == min(dapq["runs_s"]), "fastest run recorded next to the median"
    want_min = 100 * (dapq["min_s"] / r["rows"]["full"][60]["min_s"] - 1)
    assert abs(dapq["vs_full_min_pct"] - want_min) < 1e-9, "min-based overhead relative to FullKV's min"
    assert "| dapq |" in speed.markdown(r), "table row per method"


def test_ttft_runs_are_interleaved_across_methods(tiny_prompts, monkeypatch):
    """Each repeat times every method once (round-robin), so machine drift cannot favour one method."""
    model = build_tiny("llama")
    order: list[str] = []
    real_timed = speed.timed

    def spy(fn, device):
        order.append(getattr(fn, "__defaults__", None) and type(fn.__defaults__[0]).__name__ or "plain")
        return real_timed(fn, device)

    monkeypatch.setattr(speed, "timed", spy)
    speed.bench_ttft(model, TOK, [40], ["full", "dapq"], 16, repeats=3, warmup=0)
    assert len(order) == 9, f"3 repeats x 3 rows timed, got {len(order)}"
    assert order[:3] == order[3:6] == order[6:], f"same method order in every repeat: {order}"
    assert len(set(order[:3])) == 3, f"all three rows timed within one repeat: {order[:3]}"


def test_memory_peak_against_hand_computed_kv():
    """CPU allocation tracking: a FullKV prefill holds at least its whole KV; the accounted KV sizes equal the
    hand-computed 2 x layers x heads x tokens x head_dim x 4 bytes."""
    model = build_tiny("llama")
    cfg = model.config
    prompt = random_prompt(64, 3)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token_layer = 2 * cfg.num_key_value_heads * head_dim * 4  # keys + values, fp32
    full = compress(model, TOK, [prompt], get_method("full"))
    assert full.stats["kv_bytes_full"] == cfg.num_hidden_layers * 64 * per_token_layer, "full KV bytes"
    dq = compress(model, TOK, [prompt], get_method("dapq", budget=16, n_pseudo_tokens=8))
    want_peak = max(
        i * 16 * per_token_layer + (64 + 8) * per_token_layer for i in range(cfg.num_hidden_layers)
    )  # layers before i compressed to 16, layer i holds prompt + pseudo
    assert dq.stats["kv_bytes_peak"] == want_peak, f"layer-by-layer bound {dq.stats['kv_bytes_peak']} != {want_peak}"
    assert dq.stats["kv_bytes_compressed"] == cfg.num_hidden_layers * 16 * per_token_layer, "compressed KV"
    peak, _ = speed.peak_allocated(lambda: compress(model, TOK, [prompt], get_method("full")), torch.device("cpu"))
    assert peak >= full.stats["kv_bytes_full"], f"measured peak {peak} below the KV it must hold"
    n = 1 << 20
    measured, _ = speed.peak_allocated(lambda: torch.ones(n, dtype=torch.float32) * 2, torch.device("cpu"))
    assert 2 * 4 * n <= measured < 3 * 4 * n, f"two live 4 MiB tensors at the peak; measured {measured}"


def test_memory_bench_rows(tiny_prompts):
    model = build_tiny("llama")
    r = speed.bench_memory(model, TOK, [48], ["full", "dapq"], 16)
    full, dq = r["rows"]["full"][48], r["rows"]["dapq"][48]
    assert dq["kv_final"] < full["kv_final"], "compressed KV is smaller"
    assert dq["kv_accounted_peak"] < full["kv_accounted_peak"], "layer-by-layer peak is below the full KV"
    assert r["rows"]["activations only"][48]["peak_bytes"] > 0, "activations measured"


def test_throughput_and_memory_cap(tiny_prompts):
    model = build_tiny("llama")
    r = speed.bench_throughput(model, TOK, 64, 5, [1, 3], ["full", "snapkv"], 40, repeats=1, memory_cap=10**12)
    for name in ("full", "snapkv"):
        for b in (1, 3):
            cell = r["rows"][name][b]
            assert cell["tokens_per_s"] > 0 and cell["fits_cap"], f"{name} batch {b}: {cell}"
        per_row_full = r["rows"][name][3]["kv_bytes_end"] / 3
        assert r["rows"][name][1]["kv_bytes_end"] == pytest.approx(per_row_full), "KV scales with the batch"
    assert r["rows"]["snapkv"][3]["kv_bytes_end"] < r["rows"]["full"][3]["kv_bytes_end"], "compressed KV smaller"
    for name in ("full", "snapkv"):
        cell = r["rows"][name][3]
        kv, peak, layers = cell["kv_bytes_end"], cell["decode_peak_bytes"], model.config.num_hidden_layers
        # the whole cache (with room for the new tokens) is live; reserve() copies one layer at a time, so the
        # transient is one layer, not a second cache (a double count would give >= 2 x kv)
        assert kv <= peak < kv * (1 + 1 / layers) * 1.2, f"{name}: decode peak {peak} vs KV at the end {kv}"
        assert cell["memory_bytes"] == r["weights_bytes"] + peak, "memory = weights + measured decode peak"
    small = speed.bench_throughput(model, TOK, 64, 3, [1], ["full"], 16, repeats=1, memory_cap=1)
    assert small["rows"]["full"][1]["fits_cap"] is False, "nothing fits in 1 byte"
    assert "- full: none of the tested sizes\n" in speed.markdown(small), "one batch size: no extrapolation printed"
    assert "OOM" not in speed.markdown(r) and "| snapkv |" in speed.markdown(r), "table rows"


def test_estimate_max_batch_by_hand():
    gib = 1 << 30
    # 1 GiB fixed + 0.25 GiB per row: within 4 GiB, 12 rows
    measured = [(1, int(1.25 * gib)), (8, 3 * gib), (16, 5 * gib)]
    assert speed.estimate_max_batch(measured, 4 * gib) == 12
    assert speed.estimate_max_batch(measured, gib // 2) == 0, "not even the fixed part fits"
    assert speed.estimate_max_batch(measured[:1], 4 * gib) is None, "one point gives no line"


def test_bench_command_writes_json(tmp_path, monkeypatch, tiny_prompts):
    import dapq.models
    from dapq.cli import main

    model = build_tiny("llama")
    monkeypatch.setattr(dapq.models, "load_model", lambda *a, **k: (model, TOK))
    out = tmp_path / "t"
    argv = ["bench", "ttft", "--lengths", "40", "--methods", "full,dapq", "--budget", "16", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "ttft.json").read_text())
    assert data["machine"]["versions"]["torch"] == torch.__version__, "versions recorded"
    assert set(data["rows"]) == {"transformers", "full", "dapq"}
    assert (out / "ttft.md").read_text().startswith("TTFT"), "markdown table written"
    assert main(["bench", "ttft", "--methods", "nope", "--out", str(out)]) == 2, "unknown method: clear error"
    assert main(["bench", "throughput", "--memory-cap", "lots", "--out", str(out)]) == 2, "bad size: clear error"


def test_bench_variants_take_their_parameters(tiny_prompts, tmp_path):
    """`--methods learned@a --param learned@a.queries=...`: a variant is benched with its own file (here one with
    adapters) and its row is named by its label; the memory bench records the same KV peak as the plain file's."""
    from dapq.hf.adapters import init_adapters
    from dapq.methods.learned import save_queries
    from helpers import TINY_QUERIES

    model = build_tiny("llama")
    ad = init_adapters(model, ("q_proj",), 2, 4.0).as_dict()
    emb = torch.randn(6, 64) * 0.2
    path = str(save_queries(tmp_path / "ad.pt", emb, adapters=ad))
    params = {"learned@ad": {"queries": path}, "learned": {"queries": TINY_QUERIES}}
    method = speed.build_method("learned@ad", 16, params)
    assert method.suffix_adapters() is not None and method.budget == 16
    r = speed.bench_memory(model, TOK, [40], ["learned", "learned@ad"], 16, params=params)
    rows = r["rows"]
    assert rows["learned@ad"][40]["kv_accounted_peak"] == rows["learned"][40]["kv_accounted_peak"]
