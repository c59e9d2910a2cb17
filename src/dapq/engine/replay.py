"""One prefill, many methods: the recorded replay the evaluation harness uses.

The prompt's KV (and its queries) is the same with or without a pseudo suffix (causal attention), so one prefill
can serve every method and budget: `record` prefills the prompts once (with one method's pseudo suffix, e.g. DapQ's)
keeping the full prompt KV and every layer's LayerInputs, and `derive` builds each method's compressed cache from
that recording with the very selection code the serving path uses (`dapq.engine.state.select_layer` and
`dapq.engine.stages.finish_selection`); `merge` stacks derived caches so several methods decode as one batch.
Methods whose pseudo suffix differs from the recorded one need their own recording (`suffix_key` tells which
recordings a method can use). Tests prove the predictions equal `generate`'s.

    rec = record(model, tok, prompts, suffix=DapQ(budget=128))
    for method in methods:
        cc = derive(rec, method)
        tokens = greedy_decode(cc, cc.first_logits, 32, stop_token_ids(tok))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..hf.cache import LayerTrack, kv_bytes, lookahead_bytes, make_cache, set_layer
from ..methods.base import Method
from ..methods.full import FullKV
from ..methods.protocols import EmbeddedSuffix, PseudoSuffix, Staged, pseudo_length
from .decode import CompressedCache, greedy_decode
from .draft import suffix_rows
from .model_info import sync_device
from .prefill import prefill, prefill_peak
from .stages import finish_selection, lookahead_pending, lookahead_stop_ids, lookahead_valid, stage_one_cache, stage_two
from .state import EngineState, select_layer


def suffix_key(method: Method, prompts: list[list[int]], model: Any, tokenizer: Any = None) -> tuple:
    """Methods with equal keys can share a recording; () for methods without a pseudo suffix (any recording).
    A drafted suffix (SpecKV) runs its draft here, once: `dapq.engine.draft` memoises it for the recording."""
    if not isinstance(method, PseudoSuffix) or method.n_pseudo == 0:
        return ()
    rows, _ = suffix_rows(method, model, prompts, tokenizer)
    key = tuple((tuple(ids), tuple(method.pseudo_positions(len(p)))) for ids, p in zip(rows, prompts))
    return (("embedded", method.embedding_key()), *key) if isinstance(method, EmbeddedSuffix) else key


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


def record(
    model: Any, tokenizer: Any, prompts: list[list[int]], suffix: Method | None = None, *, key: tuple | None = None
) -> Recording:
    """Prefill `prompts` once (with `suffix`'s pseudo tokens, if any), keeping everything the methods need. `key`:
    the suffix's `suffix_key` when the caller has it already (`derive_all`), so a draft is not looked up twice."""
    cc = prefill(model, tokenizer, prompts, suffix if suffix is not None else FullKV(), recording=True)
    if key is None:
        key = suffix_key(suffix, prompts, model, tokenizer) if suffix is not None else ()
    return Recording(full=cc, suffix=suffix, key=key, prompts=prompts, tokenizer=tokenizer)


def derive(rec: Recording, method: Method, *, lookahead: bool = True) -> CompressedCache:
    """`method`'s compressed cache, selected from the recording exactly as the serving path would select it.

    `lookahead=False` leaves a staged method's (LAQ's) lookahead stage undone (`derive_many` batches it)."""
    return _derive(rec, method, lookahead)[0]


def _derive(
    rec: Recording, method: Method, lookahead: bool, key: tuple | None = None
) -> tuple[CompressedCache, float | None]:
    """`derive`, and the seconds spent so far when a lookahead stage is left pending (None: the cache is complete).
    `key`: the method's `suffix_key` when the caller computed it."""
    full = rec.full
    src = full.state
    info = src.info
    if pseudo_length(method):
        key = suffix_key(method, rec.prompts, full.model, rec.tokenizer) if key is None else key
        if key != rec.key:
            raise ValueError(f"{method.describe()} needs its own pseudo suffix: record(..., suffix=method) for it")
    lengths = full.prompt_lengths
    state = EngineState.create(info, method, lengths)
    start = time.perf_counter()
    for i, layer in enumerate(full.cache.layers):
        recorded = src.recorded[i]
        if recorded is None:  # a sliding layer: the recorder kept it whole
            track = src.tracks[i]
            assert track is not None
            set_layer(
                state.cache.layers[i],
                layout(layer.keys, method, info.groups),
                layout(layer.values, method, info.groups),
            )
            state.set_track(i, LayerTrack(track.pos, track.valid, track.all_valid), sum(lengths) / len(lengths))
            continue
        inp = recorded if pseudo_length(method) else recorded.prompt_only()
        inp = replace(
            inp,
            keys=layout(inp.keys, method, info.groups),
            values=layout(layer.values, method, info.groups),  # the prompt's values [B, H, T, D]
            layer_idx=i,
            memo=rec.memo[i],
        )
        select_layer(state, inp)
    first_logits = full.first_logits
    stops = lookahead_stop_ids(method, rec.tokenizer) if lookahead else None  # derive_many: its own
    next_pos, stage_peak, pass_s = finish_selection(
        full.model,
        state,
        first_logits,
        lengths,
        lookahead=lookahead,
        stop_ids=stops,
        prompts=rec.prompts,
        tokenizer=rec.tokenizer,
    )
    cc = CompressedCache(full.model, state.cache, state, first_logits, next_pos, lengths, {})
    costs = {k: full.stats[k] for k in ("draft_s", "draft_kv_bytes_peak") if k in full.stats and pseudo_length(method)}
    if pass_s:
        costs["pass_s"] = pass_s
    if lookahead_pending(state):
        sync_device(info.device)
        cc.stats = costs
        return cc, time.perf_counter() - start
    return finish_derived(cc, start, stage_peak, costs=costs), None


def finish_derived(
    cc: CompressedCache,
    start: float,
    stage_peak: int | None,
    earlier_s: float = 0.0,
    costs: dict[str, Any] | None = None,
) -> CompressedCache:
    """Fill a derived cache's stats: kept tokens, KV bytes (the peak accounted exactly as `compress` accounts it
    for this method alone), select_s = time since `start` + `earlier_s`, and the extra `costs` of the recording
    (a draft's time and KV, a context pass's time: `pass_s` is part of select_s when the pass ran here)."""
    state, method = cc.state, cc.state.method
    sync_device(state.info.device)
    t = max(cc.prompt_lengths)
    cc.stats = {
        "method": method.describe(),
        "prompt_tokens": cc.prompt_lengths,
        "kept_per_layer": [round(k, 2) for k in state.kept],
        "kept_mean": round(sum(state.kept) / len(state.kept), 2),
        "kv_bytes_compressed": kv_bytes(state.cache),
        "kv_bytes_peak": stage_peak if stage_peak is not None else prefill_peak(state.cache, t + pseudo_length(method)),
        "select_s": time.perf_counter() - start + earlier_s,
        **(costs or {}),
    }
    return cc


def derive_many(
    rec: Recording, methods: list[Method], batch_lookahead: bool = False, keys: list[tuple] | None = None
) -> list[CompressedCache]:
    """`derive` for every method. With `batch_lookahead`, the lookahead tokens of every staged method (LAQ at each
    budget) decode as one batch of stage-1 caches (padded to the longest) instead of one batch each. Batching
    changes the BLAS kernels' row counts, so the lookahead queries may differ from separate decodes in the last
    float bits (and so, rarely, a kept token): measured on 406 RULER rows, no prediction or score changed.
    `keys`: the methods' `suffix_key`s when the caller computed them (`derive_all`)."""
    keys = keys if keys is not None else [None] * len(methods)
    if not batch_lookahead:
        return [_derive(rec, m, True, k)[0] for m, k in zip(methods, keys)]
    derived = [_derive(rec, m, False, k) for m, k in zip(methods, keys)]
    out = [cc for cc, _ in derived]
    spent = {j: s for j, (_, s) in enumerate(derived) if s is not None}
    # one batch per lookahead length and cache layout (caches of two layouts do not merge)
    pending: dict[tuple[int, str], list[int]] = {}
    for j in spent:
        method = out[j].state.method
        assert isinstance(method, Staged)
        pending.setdefault((method.lookahead_tokens, method.layout), []).append(j)
    for (n, _), ids in pending.items():
        start = time.perf_counter()
        stage1 = [stage_one_cache(out[j].model, out[j].state, out[j].first_logits, out[j].next_pos) for j in ids]
        # as `lookahead_stage` accounts it: full cache + stage-1 cache + the n lookahead entries of every layer
        peaks = [
            kv_bytes(out[j].cache) + kv_bytes(s1.cache) + lookahead_bytes(s1.cache, n) for j, s1 in zip(ids, stage1)
        ]
        batch = merge(stage1)
        batch.state.start_capture()
        tokens = greedy_decode(batch, batch.first_logits, n + 1, set())  # n forward steps at L .. L+n-1, all rows
        captured = [batch.state.captured_queries(i) for i in range(batch.state.n_layers)]  # [sum B, H_q, n, D]
        shared = (time.perf_counter() - start) / len(ids)
        row = 0
        for j, peak in zip(ids, peaks):
            cc = out[j]
            b = cc.first_logits.shape[0]
            t0 = time.perf_counter()
            stops = lookahead_stop_ids(cc.state.method, rec.tokenizer)
            valid = None if stops is None else lookahead_valid(tokens[row : row + b], n, stops, cc.first_logits.device)
            stage_two(cc.state, [q[row : row + b] for q in captured], valid)
            row += b
            out[j] = finish_derived(cc, t0, peak, spent[j] + shared, cc.stats)
    return out


@dataclass
class Derived:
    """One method's compressed cache from `derive_all`, and the seconds of the prefill that recorded it (shared by
    every method derived from that recording)."""

    cache: CompressedCache
    prefill_s: float


def derive_all(
    model: Any, tokenizer: Any, prompts: list[list[int]], methods: list[Method], *, batch_lookahead: bool = False
) -> list[Derived]:
    """Every method's compressed cache of `prompts` from as few prefills as possible, in the order of `methods`.

    Methods are grouped by recording: one per distinct pseudo suffix (`suffix_key`, computed once per method: a
    SpecKV draft runs once), and the methods without a suffix reuse the first recording (the prompt's KV and
    queries do not depend on what follows it); a plain prefill only when no method has a suffix. Each group is
    derived with `derive_many`."""
    # a recording with a suffix first, so methods without one never need a prefill of their own
    order = sorted(range(len(methods)), key=lambda j: pseudo_length(methods[j]) == 0)
    keys: dict[int, tuple] = {}
    recordings: dict[tuple, Recording] = {}
    prefill_s: dict[tuple, float] = {}
    groups: dict[tuple, list[int]] = {}
    for j in order:
        method = methods[j]
        keys[j] = suffix_key(method, prompts, model, tokenizer)
        skey = keys[j]
        if skey not in recordings and not (skey == () and recordings):
            start = time.perf_counter()
            recordings[skey] = record(model, tokenizer, prompts, suffix=method if skey else None, key=skey)
            prefill_s[skey] = time.perf_counter() - start
        groups.setdefault(skey if skey in recordings else next(iter(recordings)), []).append(j)
    out: list[Derived | None] = [None] * len(methods)
    for rec_key, ids in groups.items():
        caches = derive_many(
            recordings[rec_key], [methods[j] for j in ids], batch_lookahead, keys=[keys[j] for j in ids]
        )
        for j, cc in zip(ids, caches):
            out[j] = Derived(cc, prefill_s[rec_key])
    assert all(d is not None for d in out), "every method is in one group"
    return out  # type: ignore[return-value]


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
    info = first.state.info
    cache = make_cache(info.n_layers)
    cache.layers = [type(layer)(**_layer_kwargs(layer)) for layer in first.cache.layers]
    state = EngineState.create(
        info,
        first.state.method,
        torch.cat([cc.state.row_lengths for cc in caches]),
        budgets=torch.cat([cc.state.row_budgets for cc in caches]),
        cache=cache,
    )
    for i in range(info.n_layers):
        layers = [cc.cache.layers[i] for cc in caches]
        tracks = [cc.state.tracks[i] for cc in caches]
        t = max(x.keys.shape[2] for x in layers)
        h = max(tr.pos.shape[1] for tr in tracks)
        keys = torch.cat([pad_tokens(x.keys, t, 0) for x in layers])  # [sum B, H_c, t, D]
        values = torch.cat([pad_tokens(x.values, t, 0) for x in layers])
        set_layer(cache.layers[i], keys, values)
        pos = torch.cat([pad_tokens(tr.pos.expand(-1, h, -1), t, 0) for tr in tracks])  # [sum B, H_s, t]
        valid = torch.cat([pad_tokens(tr.valid.expand(-1, h, -1), t, False) for tr in tracks])
        state.set_track(i, LayerTrack(pos, valid))
    return CompressedCache(
        first.model,
        cache,
        state,
        torch.cat([cc.first_logits for cc in caches]),
        torch.cat([cc.next_pos for cc in caches]),
        [n for cc in caches for n in cc.prompt_lengths],
        {},
    )


def pad_tokens(x: torch.Tensor, length: int, fill: float | bool) -> torch.Tensor:
    """Pad the token axis (dim 2) of [B, H, T(, D)] at the end to `length` with `fill`."""
    short = length - x.shape[2]
    if short == 0:
        return x
    shape = list(x.shape)
    shape[2] = short
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim=2)


def _layer_kwargs(layer: Any) -> dict[str, Any]:
    return {"groups": layer.groups} if hasattr(layer, "groups") else {}


def layout(states: torch.Tensor, method: Method, groups: int) -> torch.Tensor:
    """Recorded KV is per KV head; the query_head layout repeats it per query head."""
    return states.repeat_interleave(groups, dim=1) if method.layout == "query_head" and groups > 1 else states
