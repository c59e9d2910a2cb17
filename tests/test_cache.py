"""The growable cache layer: appends into reserved room behave exactly like DynamicLayer's concatenation."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from dapq.hf.cache import GrowLayer, QueryHeadLayer, reserve, set_layer


def _kv(t: int, seed: int, heads: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, t, 4, generator=g), torch.randn(2, heads, t, 4, generator=g)


def test_grow_layer_matches_dynamic_layer_and_copies_nothing_after_reserve():
    ours, ref = GrowLayer(), DynamicLayer()
    for layer in (ours, ref):
        layer.update(*_kv(10, 0))
    assert ours.room() == 0, "the prefill step must not reserve extra memory"
    reserve_ptr = None
    for step in range(1, 8):
        if step == 2:
            ours.reserve(5)
            reserve_ptr = ours.keys.data_ptr()
        k, v = _kv(1, step)
        got, want = ours.update(k, v), ref.update(k, v)
        torch.testing.assert_close(got[0], want[0], msg=f"keys after step {step}")
        torch.testing.assert_close(got[1], want[1], msg=f"values after step {step}")
        if 2 <= step <= 6:
            assert ours.keys.data_ptr() == reserve_ptr, f"step {step} should write into the reserved room"
    assert ours.keys.shape == (2, 3, 17, 4), f"17 tokens cached; got {tuple(ours.keys.shape)}"


def test_cut_back_then_append_overwrites_the_dropped_tokens():
    layer = GrowLayer()
    layer.update(*_kv(6, 0))
    layer.reserve(4)
    layer.update(*_kv(2, 1))
    layer.keys, layer.values = layer.keys[:, :, :6], layer.values[:, :, :6]  # what restore() does
    k, v = _kv(1, 2)
    layer.update(k, v)
    torch.testing.assert_close(layer.keys[:, :, 6:], k, msg="the appended token follows the restored length")
    assert layer.keys.shape[2] == 7, f"expected 7 tokens; got {layer.keys.shape[2]}"


def test_replaced_tensors_leave_the_buffer():
    layer = GrowLayer()
    layer.update(*_kv(6, 0))
    layer.reserve(4)
    k, v = _kv(3, 5)
    set_layer(layer, k, v)  # pruning replaces the layer's tensors
    assert layer.room() == 0, "a replaced tensor must not be written into the old buffer"
    k2, v2 = _kv(1, 6)
    layer.update(k2, v2)
    torch.testing.assert_close(layer.keys, torch.cat([k, k2], dim=2), msg="append after replacement")
    torch.testing.assert_close(k, _kv(3, 5)[0], msg="the caller's tensor must not be modified")


def test_query_head_layer_repeats_then_grows():
    layer = QueryHeadLayer(groups=3)
    layer.update(*_kv(4, 0, heads=1))
    layer.reserve(2)
    k, v = _kv(1, 1, heads=1)
    layer.update(k, v)
    assert layer.keys.shape == (2, 3, 5, 4), f"KV repeated per query head; got {tuple(layer.keys.shape)}"
    torch.testing.assert_close(layer.keys[:, 2, 4:], k[:, 0], msg="repeated key of the appended token")


def test_reserve_skips_layers_that_are_not_ours():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layers = [DynamicLayer()]
    reserve(cache, 8)  # must not fail on a plain layer
    assert not cache.layers[0].is_initialized
