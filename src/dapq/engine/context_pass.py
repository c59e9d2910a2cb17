"""The second forward of a `ContextPass` method (KVzip's context reconstruction), on the full prompt cache.

At prefill the method's layers keep their full prompt KV and a `PassObservation` (`dapq.engine.state.select_layer`).
`context_pass` then feeds every row's chunks (`method.pass_chunks`) at positions L.. with query capture on, scores
the prompt keys of every evicted layer with `method.pass_scores` (max over chunks), cuts each chunk's KV off again,
and lets `method.select_layers` choose every layer at once. Scores do not depend on the budget: they are memoised
in the observation's memo (a recording's, in the harness), so every budget derived from one recording shares one
pass, and its time is reported with each of them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..hf.cache import kv_bytes, lookahead_bytes, reserve, restore, snapshot
from ..methods.protocols import ContextPass
from .decode import CompressedCache, append
from .model_info import sync_device
from .state import EngineState, PassObservation


def context_pass_pending(state: EngineState) -> bool:
    """True while a context-pass method's layers wait for their pass."""
    return isinstance(state.method, ContextPass) and any(o is not None for o in state.pass_waiting)


def context_pass(
    model: Any,
    state: EngineState,
    first_logits: torch.Tensor,
    next_pos: torch.Tensor,
    prompts: list[list[int]],
    tokenizer: Any,
) -> tuple[int, float]:
    """Run the pass (or reuse its memoised scores), select every evicted layer; returns (peak KV bytes: the full
    prompt cache plus the longest chunk's entries, seconds the pass took when it ran)."""
    method = state.method
    assert isinstance(method, ContextPass)
    cache = state.cache
    observed = {i: o for i, o in enumerate(state.pass_waiting) if o is not None}
    key = method.pass_key()
    chunks = [method.pass_chunks(list(p), tokenizer) for p in prompts]
    longest = max((len(c.ids) for row in chunks for c in row), default=0)
    peak = kv_bytes(cache) + lookahead_bytes(cache, longest)
    first = observed[min(observed)]
    if all(key in o.memo for o in observed.values()):
        scores = {i: o.memo[key] for i, o in observed.items()}
        seconds = float(first.memo[("pass_s", key)])
    else:
        sync_device(state.info.device)
        start = time.perf_counter()
        scores = run_chunks(model, state, first_logits, next_pos, chunks, observed, tokenizer)
        sync_device(state.info.device)
        seconds = time.perf_counter() - start
        for i, o in observed.items():
            o.memo[key] = scores[i]
        first.memo[("pass_s", key)] = seconds
    valid = state.tracks[min(observed)].valid[:, 0]  # [B, T]
    per_layer = [scores.get(i) for i in range(state.n_layers)]
    budgets = [torch.tensor(state.layer_budgets(i), device=valid.device) for i in range(state.n_layers)]
    chosen = method.select_layers(per_layer, valid, budgets)
    for i in observed:
        state.take_pass(i)
        pick = chosen[i]
        assert pick is not None
        state.keep_tokens(i, *pick)
    return peak, seconds


def run_chunks(
    model: Any,
    state: EngineState,
    first_logits: torch.Tensor,
    next_pos: torch.Tensor,
    chunks: list[list[Any]],
    observed: dict[int, PassObservation],
    tokenizer: Any,
) -> dict[int, torch.Tensor]:
    """Feed chunk j of every row (rows without one feed nothing), score, cut it off; per layer the max over chunks
    [B, H_c, T]."""
    method = state.method
    assert isinstance(method, ContextPass)
    cache = state.cache
    t = cache.layers[min(observed)].keys.shape[2]
    device = next_pos.device
    pad = [t - int(n) for n in state.length_list]  # left padding of each row
    reserve(cache, max(len(c.ids) for row in chunks for c in row))  # one copy now, none per chunk
    snap = snapshot(cache, state.tracks)
    runner = CompressedCache(model, cache, state, first_logits, next_pos.clone(), state.length_list, {})
    scores: dict[int, torch.Tensor] = {}
    for j in range(max(len(row) for row in chunks)):
        rows = [row[j].ids if j < len(row) else [] for row in chunks]
        q = max(len(r) for r in rows)
        span = torch.zeros(len(rows), t, dtype=torch.bool)
        pass_valid = torch.zeros(len(rows), q, dtype=torch.bool)
        for b, row in enumerate(chunks):
            if j < len(row):
                span[b, pad[b] + row[j].start : pad[b] + row[j].end] = True
                pass_valid[b, q - len(rows[b]) :] = True
        span, pass_valid = span.to(device), pass_valid.to(device)
        runner.next_pos = next_pos.clone()
        state.start_capture()
        append(runner, rows, int(getattr(tokenizer, "pad_token_id", None) or 0))
        for i, obs in observed.items():
            layer, track = cache.layers[i], state.tracks[i]
            assert track is not None
            s = method.pass_scores(
                state.captured_queries(i),
                layer.keys[:, :, t:],
                pass_valid,
                layer.keys[:, :, :t],
                snap.tracks[i].valid[:, 0],
                span,
                obs.scaling,
            )
            scores[i] = s if i not in scores else torch.maximum(scores[i], s)
        state.stop_capture()
        restore(cache, state.tracks, snap)
    return scores
