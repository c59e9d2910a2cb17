"""One prefill, many methods: the evaluation path.

The prompt's KV (and its queries) is the same with or without a pseudo suffix (causal attention), so one prefill
can serve every method and budget: `record` prefills the prompts once (with one method's pseudo suffix, e.g. DapQ's)
keeping the full prompt KV and every layer's rotated queries/keys, and `derive` builds each method's compressed
cache from that recording with the very selection code the serving path uses (`dapq.hf.attention.apply_selection`),
then decodes from it. Methods whose pseudo suffix differs from the recorded one need their own recording
(`suffix_key` tells which recordings a method can use). Tests prove the predictions equal `generate`'s.

    rec = record(model, tok, prompts, suffix=DapQ(budget=128))
    for method in methods:
        cc = derive(rec, method)
        tokens = greedy_decode(cc, cc.first_logits, 32, stop_token_ids(tok))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .generation import (
    CompressedCache,
    _lookahead_stage,
    _renumber_positions,
    _sync,
    compress,
    kv_groups,
)
from .hf.attention import EngineState, apply_selection
from .hf.cache import LayerTrack, kv_bytes, make_cache, set_layer
from .methods.base import LayerInputs, Method


@dataclass
class _Recorder(Method):
    """Keeps the full prompt KV and records every layer's LayerInputs; carries `suffix`'s pseudo tokens."""

    suffix: Method | None = None

    @property
    def n_pseudo(self) -> int:
        return self.suffix.n_pseudo if self.suffix is not None else 0

    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        return self.suffix.pseudo_ids(prompt_ids, vocab_size, tokenizer) if self.suffix is not None else []

    def pseudo_positions(self, prompt_len: int) -> list[int]:
        return self.suffix.pseudo_positions(prompt_len) if self.suffix is not None else []

    @property
    def compresses(self) -> bool:
        return True

    @property
    def deferred(self) -> bool:
        return True

    def token_budget(self, prompt_len: int) -> int:
        return 0  # "evict" every layer, so that every layer is observed

    def observe(self, inp: LayerInputs) -> LayerInputs:
        return inp


def suffix_key(method: Method, prompts: list[list[int]], vocab_size: int, tokenizer: Any = None) -> tuple:
    """Methods with equal keys can share a recording; () for methods without a pseudo suffix (any recording)."""
    if method.n_pseudo == 0:
        return ()
    return tuple(
        (tuple(method.pseudo_ids(list(p), vocab_size, tokenizer)), tuple(method.pseudo_positions(len(p))))
        for p in prompts
    )


@dataclass
class Recording:
    """The full prompt cache of one prefill and every layer's recorded LayerInputs."""

    full: CompressedCache
    suffix: Method | None
    key: tuple
    prompts: list[list[int]]
    tokenizer: Any = None
    # per layer: budget-independent scores already computed for a method config (shared by its budgets)
    memo: list[dict[Any, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.memo:
            self.memo = [{} for _ in self.full.cache.layers]


def record(model: Any, tokenizer: Any, prompts: list[list[int]], suffix: Method | None = None) -> Recording:
    """Prefill `prompts` once (with `suffix`'s pseudo tokens, if any), keeping everything the methods need."""
    cc = compress(model, tokenizer, prompts, _Recorder(suffix=suffix))
    vocab = model.get_input_embeddings().weight.shape[0]
    key = suffix_key(suffix, prompts, vocab, tokenizer) if suffix is not None else ()
    return Recording(full=cc, suffix=suffix, key=key, prompts=prompts, tokenizer=tokenizer)


def _slice(inp: LayerInputs, n_pseudo: int) -> LayerInputs:
    """Drop the recorded pseudo suffix from the inputs (for methods that do not use it)."""
    if n_pseudo == 0 or inp.n_pseudo == 0:
        return inp
    t = inp.prompt_len
    return LayerInputs(
        queries=inp.queries[:, :, :t],
        keys=inp.keys[:, :, :t],
        positions=inp.positions[:, :t],
        valid=inp.valid[:, :t],
        budgets=inp.budgets,
        prompt_len=t,
        scaling=inp.scaling,
        layer_idx=inp.layer_idx,
        n_layers=inp.n_layers,
    )


def derive(rec: Recording, method: Method) -> CompressedCache:
    """`method`'s compressed cache, selected from the recording exactly as the serving path would select it."""
    full = rec.full
    if method.n_pseudo:
        vocab = full.model.get_input_embeddings().weight.shape[0]
        if suffix_key(method, rec.prompts, vocab, rec.tokenizer) != rec.key:
            raise ValueError(f"{method.describe()} needs its own pseudo suffix: record(..., suffix=method) for it")
    src = full.state
    groups = kv_groups(full.model)
    device = full.next_pos.device
    lengths = full.prompt_lengths
    state = EngineState(
        cache=make_cache(src.n_layers, method.layout, groups),
        method=method,
        n_layers=src.n_layers,
        inner=src.inner,
        row_budgets=torch.tensor([method.token_budget(n) for n in lengths], device=device),
        row_lengths=torch.tensor(lengths, device=device),
        sliding=src.sliding,
    )
    state.configs = src.configs
    start = time.perf_counter()
    for i, layer in enumerate(full.cache.layers):
        recorded = src.observed[i]
        if recorded is None:  # a sliding layer: the recorder kept it whole
            track = src.tracks[i]
            set_layer(state.cache.layers[i], _layout(layer.keys, method, groups), _layout(layer.values, method, groups))
            state.tracks[i] = LayerTrack(track.pos, track.valid, track.all_valid)
            state.kept[i] = sum(lengths) / len(lengths)
            continue
        inp = recorded if method.n_pseudo else _slice(recorded, rec.suffix.n_pseudo if rec.suffix else 0)
        inp = LayerInputs(
            queries=inp.queries,
            keys=_layout(inp.keys, method, groups),
            positions=inp.positions,
            valid=inp.valid,
            budgets=inp.budgets,
            prompt_len=inp.prompt_len,
            scaling=inp.scaling,
            layer_idx=i,
            n_layers=inp.n_layers,
            memo=rec.memo[i],
        )
        apply_selection(state, inp, _layout(layer.values, method, groups))  # values [B, H, T, D]: prompt only
    first_logits = full.first_logits
    next_pos = full.next_pos.clone()
    if method.renumbers_positions:
        next_pos = _renumber_positions(full.model, state.cache, state)
    if method.lookahead_tokens and any(o is not None for o in state.observed):
        _lookahead_stage(full.model, state.cache, state, first_logits, next_pos, groups)
    _sync(device)
    stats = {
        "method": method.describe(),
        "prompt_tokens": lengths,
        "kept_per_layer": [round(k, 2) for k in state.kept],
        "kept_mean": round(sum(state.kept) / len(state.kept), 2),
        "kv_bytes_compressed": kv_bytes(state.cache),
        "select_s": time.perf_counter() - start,
    }
    return CompressedCache(full.model, state.cache, state, first_logits, next_pos, lengths, stats)


def merge(caches: list[CompressedCache]) -> CompressedCache:
    """Stack compressed caches of the same prompt(s) along the batch axis, so several methods decode as one batch.

    Layers of different lengths (other budgets, PyramidKV's per-layer budgets) are padded at the end with invalid
    entries (zeros, masked out by their tracked validity), so any caches of one layout merge; the padding costs
    attention work on the longest row's length, which is why the runner groups caches of similar lengths. The result
    is always a copy (decoding it leaves the inputs untouched), also for one cache."""
    first = caches[0]
    layouts = {type(cc.cache.layers[0]) for cc in caches}
    if len(layouts) > 1:
        raise ValueError("merge needs caches of one layout (kv_head or query_head)")
    cache = make_cache(first.state.n_layers)
    cache.layers = [type(layer)(**_layer_kwargs(layer)) for layer in first.cache.layers]
    state = EngineState(
        cache=cache,
        method=first.state.method,
        n_layers=first.state.n_layers,
        inner=first.state.inner,
        row_budgets=torch.cat([cc.state.row_budgets for cc in caches]),
        row_lengths=torch.cat([cc.state.row_lengths for cc in caches]),
        sliding=first.state.sliding,
    )
    state.configs = first.state.configs
    for i in range(first.state.n_layers):
        layers = [cc.cache.layers[i] for cc in caches]
        tracks = [cc.state.tracks[i] for cc in caches]
        t = max(x.keys.shape[2] for x in layers)
        h = max(tr.pos.shape[1] for tr in tracks)
        keys = torch.cat([_pad_tokens(x.keys, t, 0) for x in layers])  # [sum B, H_c, t, D]
        values = torch.cat([_pad_tokens(x.values, t, 0) for x in layers])
        set_layer(cache.layers[i], keys, values)
        pos = torch.cat([_pad_tokens(tr.pos.expand(-1, h, -1), t, 0) for tr in tracks])  # [sum B, H_s, t]
        valid = torch.cat([_pad_tokens(tr.valid.expand(-1, h, -1), t, False) for tr in tracks])
        state.tracks[i] = LayerTrack(pos, valid)
    return CompressedCache(
        first.model,
        cache,
        state,
        torch.cat([cc.first_logits for cc in caches]),
        torch.cat([cc.next_pos for cc in caches]),
        [n for cc in caches for n in cc.prompt_lengths],
        {},
    )


def _pad_tokens(x: torch.Tensor, length: int, fill: float | bool) -> torch.Tensor:
    """Pad the token axis (dim 2) of [B, H, T(, D)] at the end to `length` with `fill`."""
    short = length - x.shape[2]
    if short == 0:
        return x
    shape = list(x.shape)
    shape[2] = short
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim=2)


def _layer_kwargs(layer: Any) -> dict[str, Any]:
    return {"groups": layer.groups} if hasattr(layer, "groups") else {}


def _layout(states: torch.Tensor, method: Method, groups: int) -> torch.Tensor:
    """Recorded KV is per KV head; the query_head layout repeats it per query head."""
    return states.repeat_interleave(groups, dim=1) if method.layout == "query_head" and groups > 1 else states
