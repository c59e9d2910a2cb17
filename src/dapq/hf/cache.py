"""Cache bookkeeping: our DynamicCache layout, per-layer key positions and validity, pruning gathers, snapshots.

Cache tensors are [B, H_c, T, D]: H_c = H_kv (`kv_head` layout) or H_q (`query_head` layout, KV repeated per
query head like the KVCache-Factory reference code). Alongside each layer we track, per cached entry, its original
position id and whether it is a real token (pads and unused filler slots are not) as [B, H_s, T] with H_s = 1
while all heads hold the same tokens and H_s = H_c once per-head eviction made them differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class QueryHeadLayer(DynamicLayer):
    """A dynamic cache layer that stores KV repeated per query head (the reference `query_head` layout)."""

    def __init__(self, groups: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
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
        cache.layers = [DynamicLayer() for _ in range(n_layers)]
    cache.layer_class_to_replicate = None
    return cache


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
    layer.keys, layer.values = keys, values


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values of every initialised layer."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


@dataclass
class Snapshot:
    """Per-layer lengths of a cache and its tracks, to restore the cache after a question was appended."""

    lengths: list[int]
    tracks: list[LayerTrack]


def snapshot(cache: DynamicCache, tracks: list[LayerTrack]) -> Snapshot:
    return Snapshot(
        [layer.keys.shape[-2] for layer in cache.layers], [LayerTrack(t.pos, t.valid, t.all_valid) for t in tracks]
    )


def restore(cache: DynamicCache, tracks: list[LayerTrack], snap: Snapshot) -> None:
    """Cut every layer back to its snapshot length (tokens appended since then are dropped)."""
    for i, (layer, n) in enumerate(zip(cache.layers, snap.lengths)):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]
        tracks[i] = LayerTrack(snap.tracks[i].pos, snap.tracks[i].valid, snap.tracks[i].all_valid)
