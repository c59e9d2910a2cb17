"""The stages after a prefill's selection: a context pass (KVzip, `dapq.engine.context_pass`), a staged method's
lookahead (LAQ) and renumbered positions (StreamingLLM rerotate). `finish_selection` runs whichever the method
declares; serving and replay both call it."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DapqError
from ..hf.cache import LayerTrack, gather_tokens, kv_bytes, set_layer
from ..hf.rope import rerotate_keys, rotary_module
from ..methods.protocols import Staged, renumbers
from ..prompts import stop_token_ids
from .context_pass import context_pass, context_pass_pending
from .decode import CompressedCache, greedy_decode
from .state import EngineState


def finish_selection(
    model: Any,
    state: EngineState,
    first_logits: torch.Tensor,
    lengths: list[int],
    *,
    lookahead: bool = True,
    prompts: list[list[int]] | None = None,
    tokenizer: Any = None,
    stop_ids: set[int] | None = None,
) -> tuple[torch.Tensor, int | None, float]:
    """Run the post-selection stages of `state.method` on `state.cache`; returns each row's next position [B], the
    peak KV bytes of a lookahead stage or context pass (else None) and the context pass's seconds (0 without one).
    `lookahead=False` leaves a staged method's lookahead to the caller (`dapq.engine.replay.derive_many` decodes
    several of them as one batch). A context pass (KVzip) needs the rows' `prompts` and the `tokenizer`.
    `stop_ids`: where the lookahead of a method that stops at EOS stops (`lookahead_stop_ids`)."""
    device = state.info.device
    next_pos = torch.tensor(lengths, device=device)
    peak, pass_s = None, 0.0
    if context_pass_pending(state):
        if prompts is None:
            raise DapqError(f"{state.method.name} runs a context pass: finish_selection needs the prompts.")
        peak, pass_s = context_pass(model, state, first_logits, next_pos, prompts, tokenizer)
    if renumbers(state.method):
        next_pos = renumber_positions(model, state)
    if lookahead and lookahead_pending(state):
        peak = lookahead_stage(model, state, first_logits, next_pos, stop_ids)
    return next_pos, peak, pass_s


def lookahead_pending(state: EngineState) -> bool:
    """True while a staged method's observations wait for their lookahead stage."""
    return isinstance(state.method, Staged) and any(o is not None for o in state.stage_one)


def lookahead_stage(
    model: Any, state: EngineState, first_logits: torch.Tensor, next_pos: torch.Tensor, stop_ids: set[int] | None = None
) -> int:
    """A staged method's second stage on a full prompt cache: build the stage-1 cache from the observed
    selections, decode the lookahead tokens on it at positions L.. while capturing their queries, then select from
    the full cache with them. Returns the peak KV bytes (full + stage-1 + lookahead). The lookahead tokens leave
    nothing behind. With `stop_ids` (a method that stops at EOS), stage 2 uses each row's queries up to its stop."""
    method = state.method
    assert isinstance(method, Staged)
    n = method.lookahead_tokens
    s1 = stage_one_cache(model, state, first_logits, next_pos)
    tokens = greedy_decode(s1, first_logits, n + 1, set())  # n forward steps at L .. L+n-1
    peak = kv_bytes(state.cache) + kv_bytes(s1.cache)
    valid = lookahead_valid(tokens, n, stop_ids, first_logits.device) if stop_ids is not None else None
    captured = [s1.state.captured_queries(i) if s1.state.capture[i] else None for i in range(state.n_layers)]
    stage_two(state, captured, valid)
    return peak


def lookahead_stop_ids(method: Any, tokenizer: Any) -> set[int] | None:
    """The ids a staged method's lookahead stops at: the tokenizer's stop tokens (`dapq.prompts.stop_token_ids`, the
    set decoding stops at) when the method declares `lookahead_stops_at_eos`, else None."""
    if not (isinstance(method, Staged) and method.lookahead_stops_at_eos):
        return None
    if tokenizer is None:
        raise DapqError(
            f"{method.name} stops its lookahead at end-of-sequence and needs the tokenizer's stop ids: pass the "
            "tokenizer (record(model, tokenizer, ...))."
        )
    return stop_token_ids(tokenizer)


def lookahead_valid(tokens: list[list[int]], n: int, stop_ids: set[int], device: Any) -> torch.Tensor:  # [B, n]
    """Which of the n lookahead queries each row uses when its lookahead stops at `stop_ids`, as the reference loop
    feeds tokens: query k is that of token k (token 0 = the prefill's argmax, always fed); token k > 0 is fed only
    when none of tokens 1..k is a stop id. `tokens` holds each row's n + 1 greedy tokens (the last one is never fed)."""
    rows = []
    for toks in tokens:
        first_stop = next((k for k in range(1, n) if toks[k] in stop_ids), n)
        rows.append([k < first_stop for k in range(n)])
    return torch.tensor(rows, dtype=torch.bool, device=device)


def stage_one_cache(
    model: Any, state: EngineState, first_logits: torch.Tensor, next_pos: torch.Tensor
) -> CompressedCache:
    """The stage-1 cache of a staged method (its observed stage-1 selections of the full prompt cache), with query
    capture on, ready to decode the lookahead tokens."""
    cache = state.cache
    s1_state = EngineState.create(state.info, state.method, state.length_list, budgets=state.row_budgets)
    stage1 = s1_state.cache
    for i, layer in enumerate(cache.layers):
        obs = state.stage_one[i]
        track = state.tracks[i]
        assert track is not None
        if obs is None:  # not evicted (sliding layer, or budget >= prompt): the stage-1 layer is the full one
            set_layer(stage1.layers[i], layer.keys, layer.values)
            s1_state.set_track(i, LayerTrack(track.pos, track.valid, track.all_valid))  # a copy: decoding appends
            continue
        idx = obs.indices  # [B, H_c, k]
        set_layer(stage1.layers[i], gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx))
        s1_state.set_track(i, LayerTrack(track.pos.expand(-1, idx.shape[1], -1).gather(-1, idx), obs.kept_valid))
    s1_state.start_capture()
    return CompressedCache(model, stage1, s1_state, first_logits, next_pos.clone(), [], {})


def stage_two(
    state: EngineState, lookahead: list[torch.Tensor | None], lookahead_valid: torch.Tensor | None = None
) -> None:
    """A staged method's final selection from the full prompt cache with each layer's lookahead queries
    [B, H_q, n, D] (None for layers that were not evicted) and, for a method that stops at EOS, which of them each
    row uses (`lookahead_valid` [B, n]; only then is it passed, so other staged methods keep the short signature)."""
    method = state.method
    assert isinstance(method, Staged)
    for i, layer in enumerate(state.cache.layers):
        obs = state.take_stage_one(i)
        if obs is None:
            continue
        lookahead_q = lookahead[i]
        assert lookahead_q is not None
        track = state.tracks[i]  # the full prompt: pos/valid [B, 1, T]
        assert track is not None
        extra = {} if lookahead_valid is None else {"lookahead_valid": lookahead_valid}
        idx, kept_valid = method.stage2_select(
            lookahead_q, layer.keys, track.pos[:, 0], track.valid[:, 0], obs, **extra
        )
        state.keep_tokens(i, idx, kept_valid)


def renumber_positions(model: Any, state: EngineState) -> torch.Tensor:
    """Re-rotate every layer's kept keys to contiguous positions 0..k-1 (row order kept); returns each row's next
    position k. Needs the same kept count per row in every layer and head (StreamingLLM with a uniform budget)."""
    if any(state.info.sliding):
        raise DapqError("rerotate=True is not supported for models with sliding-window layers: use rerotate=False.")
    rotary = rotary_module(model)
    counts = None
    for layer, track in zip(state.cache.layers, state.tracks):
        assert track is not None
        kept = track.valid.sum(-1)  # [B, H_s]
        if counts is None:
            counts = kept[:, 0]
        if not bool((kept == counts[:, None]).all()):
            raise DapqError("rerotate=True needs every layer and head to keep the same number of tokens per row.")
        # valid entries come first in ascending original order (select_topk); filler slots go to the end
        rank = torch.cumsum(track.valid.long(), dim=-1) - 1  # [B, H_s, T]
        new = torch.where(track.valid, rank, track.pos)
        h = layer.keys.shape[1]
        layer.keys = rerotate_keys(rotary, layer.keys, track.pos.expand(-1, h, -1), new.expand(-1, h, -1))
        track.pos = new
    assert counts is not None
    return counts.to(torch.long)
