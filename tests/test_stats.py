"""KV memory accounting in `stats` against hand-computed sizes on a tiny model."""

from __future__ import annotations

from dapq import DapQ, FullKV, get_method
from dapq.engine import compress
from helpers import METHOD_PARAMS, TinyTokenizer, build_tiny, random_prompt

TOK = TinyTokenizer()
L = 40


def _per_token(model, heads: int | None = None) -> int:
    cfg = model.config
    h = heads or cfg.num_key_value_heads
    return h * (cfg.hidden_size // cfg.num_attention_heads) * 4 * 2  # fp32 keys + values, one token, one layer


def test_fullkv_bytes_and_peak():
    model = build_tiny("llama")
    cc = compress(model, TOK, [random_prompt(L, 0)], FullKV())
    full = model.config.num_hidden_layers * L * _per_token(model)
    assert cc.stats["kv_bytes_full"] == full
    assert cc.stats["kv_bytes_compressed"] == full
    assert cc.stats["kv_bytes_peak"] == full, "FullKV's peak is its full cache"


def test_dapq_peak_is_one_full_layer_plus_compressed_others():
    model = build_tiny("llama")
    n_layers, budget, n = model.config.num_hidden_layers, 12, 8
    cc = compress(model, TOK, [random_prompt(L, 0)], DapQ(budget=budget, n_pseudo_tokens=n))
    per = _per_token(model)
    assert cc.stats["kv_bytes_compressed"] == n_layers * budget * per
    # the last layer holds its prompt + pseudo entries while all earlier layers are compressed
    assert cc.stats["kv_bytes_peak"] == (n_layers - 1) * budget * per + (L + n) * per
    assert cc.stats["kept_mean"] == budget


def test_laq_peak_is_full_plus_stage1_plus_lookahead():
    model = build_tiny("llama")
    n_layers, budget = model.config.num_hidden_layers, 12
    params = METHOD_PARAMS["laq"]
    cc = compress(model, TOK, [random_prompt(L, 0)], get_method("laq", budget=budget, **params))
    per = _per_token(model)
    want = n_layers * L * per + n_layers * (budget + params["n_lookahead"]) * per
    assert cc.stats["kv_bytes_peak"] == want, f"{cc.stats['kv_bytes_peak']} != full + stage-1 + lookahead {want}"
    assert cc.stats["kv_bytes_compressed"] == n_layers * budget * per
