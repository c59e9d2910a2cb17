"""Cache bookkeeping: our DynamicCache layout, per-layer key positions and validity, pruning gathers, snapshots.

Cache tensors are [B, H_c, T, D]: H_c = H_kv (`kv_head` layout) or H_q (`query_head` layout, KV repeated per
query head like the KVCache-Factory reference code). Alongside each layer we track, per cached entry, its original
position id and whether it is a real token (pads and unused filler slots are not) as [B, H_s, T] with H_s = 1
while all heads hold the same tokens and H_s = H_c once per-head eviction made them differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowLayer(DynamicLayer):
    """A DynamicLayer whose appends write into reserved room instead of re-concatenating the whole layer.

    DynamicLayer copies all T cached entries for every decoded token (O(T) per step per layer); here the first
    update (the prefill) stores its tensors as they are (no extra memory), and later appends go into a buffer with
    room for `reserve(extra)` more tokens (the decoder reserves max_new_tokens up front; unreserved growth adds
    64 slots at a time). `keys`/`values` stay [B, H_c, T, D] views of the buffer, so everything that reads or
    replaces them (pruning, restore, crop) works as with DynamicLayer: a replaced tensor simply leaves the buffer.
    """

    GROW = 64

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None  # [B, H_c, capacity, D]
        self._vbuf: torch.Tensor | None = None

    def _in_buffer(self) -> bool:
        kb, vb = self._kbuf, self._vbuf
        return (
            kb is not None
            and vb is not None
            and self.keys is not None
            and self.keys.dim() == 4
            and self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.stride() == kb.stride()
            and self.values.stride() == vb.stride()
            and self.keys.shape[:2] == kb.shape[:2]
        )

    def room(self) -> int:
        """Tokens that can still be appended without a copy."""
        if not self._in_buffer():
            return 0
        assert self._kbuf is not None
        return self._kbuf.shape[2] - self.keys.shape[2]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens (one copy of the layer now instead of one per appended token)."""
        if not self.is_initialized or self.keys is None or self.keys.dim() != 4 or self.room() >= extra:
            return
        b, h, n, d = self.keys.shape
        kb = self.keys.new_empty(b, h, n + extra, d)
        vb = self.values.new_empty(b, h, n + extra, self.values.shape[-1])
        kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
        self._kbuf, self._vbuf = kb, vb
        self.keys, self.values = kb[:, :, :n], vb[:, :, :n]

    def release(self) -> None:
        """Forget the buffer (called when the layer's tensors are replaced)."""
        self._kbuf = self._vbuf = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys is None or self.keys.numel() == 0:  # the first (prefill) step: no room reserved
            self.release()
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        q = key_states.shape[2]
        if self.room() < q:
            self.reserve(q + self.GROW)
        assert self._kbuf is not None and self._vbuf is not None
        n = self.keys.shape[2]
        self._kbuf[:, :, n : n + q] = key_states
        self._vbuf[:, :, n : n + q] = value_states
        self.keys, self.values = self._kbuf[:, :, : n + q], self._vbuf[:, :, : n + q]
        return self.keys, self.values

    def reset(self) -> None:
        self.release()
        super().reset()


class QueryHeadLayer(GrowLayer):
    """A cache layer that stores KV repeated per query head (the reference `query_head` layout)."""

    def __init__(self, groups: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.groups = groups

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.groups > 1:  # [B, H_kv, t, D] -> [B, H_q, t, D], each KV head repeated for its group
            key_states = key_states.repeat_interleave(self.groups, dim=1)
            value_states = value_states.repeat_interleave(self.groups, dim=1)
        return super().update(key_states, value_states, *args, **kwargs)


def make_cache(n_layers: int, layout: str = "kv_head", groups: int = 1) -> DynamicCache:
    """A DynamicCache of plain full-length layers (sliding-window layers are masked by position, never evicted)."""
    cache = DynamicCache()
    if layout == "query_head":
        cache.layers = [QueryHeadLayer(groups) for _ in range(n_layers)]
    else:
        cache.layers = [GrowLayer() for _ in range(n_layers)]
    cache.layer_class_to_replicate = None
    return cache


def reserve(cache: DynamicCache, extra: int) -> None:
    """Reserve room for `extra` appended tokens in every layer (decoding then copies nothing per step)."""
    for layer in cache.layers:
        if isinstance(layer, GrowLayer):
            layer.reserve(extra)


@dataclass
class LayerTrack:
    """Original positions and validity of one layer's cached entries."""

    pos: torch.Tensor  # [B, H_s, T] long
    valid: torch.Tensor  # [B, H_s, T] bool
    all_valid: bool | None = None  # cached valid.all(), so decode steps need no device sync

    def __post_init__(self) -> None:
        if self.all_valid is None:
            self.all_valid = bool(self.valid.all())

    @property
    def length(self) -> int:
        return self.pos.shape[-1]

    def append(self, pos: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> None:
        """Append new tokens: `pos` and `valid` are [B, q]; `all_valid` is valid.all()."""
        h = self.pos.shape[1]
        self.pos = torch.cat([self.pos, pos[:, None, :].expand(-1, h, -1)], dim=-1)
        self.valid = torch.cat([self.valid, valid[:, None, :].expand(-1, h, -1)], dim=-1)
        self.all_valid = bool(self.all_valid) and all_valid


def gather_tokens(states: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """states [B, H_c, T, D], idx [B, H_c, k] -> [B, H_c, k, D]."""
    return states.gather(2, idx[..., None].expand(-1, -1, -1, states.shape[-1]))


def set_layer(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a (possibly fresh) cache layer these keys/values [B, H_c, T, D]."""
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    if isinstance(layer, GrowLayer):
        layer.release()
    layer.keys, layer.values = keys, values


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values of every initialised layer."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def lookahead_bytes(cache: DynamicCache, n: int) -> int:
    """Bytes of `n` more entries (keys + values) in every layer of `cache`."""
    return sum(
        2 * n * x.keys.shape[0] * x.keys.shape[1] * x.keys.shape[3] * x.keys.element_size() for x in cache.layers
    )


@dataclass
class Snapshot:
    """Per-layer lengths of a cache and its tracks, to restore the cache after a question was appended."""

    lengths: list[int]
    tracks: list[LayerTrack]


def snapshot(cache: DynamicCache, tracks: list[Any]) -> Snapshot:
    return Snapshot(
        [layer.keys.shape[-2] for layer in cache.layers], [LayerTrack(t.pos, t.valid, t.all_valid) for t in tracks]
    )


def restore(cache: DynamicCache, tracks: list[Any], snap: Snapshot) -> None:
    """Cut every layer back to its snapshot length (tokens appended since then are dropped)."""
    for i, (layer, n) in enumerate(zip(cache.layers, snap.lengths)):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]
        tracks[i] = LayerTrack(snap.tracks[i].pos, snap.tracks[i].valid, snap.tracks[i].all_valid)
