"""Compression that holds during decoding: every `interval` generated tokens the cache is re-scored with the method's
scores on the recent queries and evicted back to the budget.

The semantics follow kvpress's DecodingPress (a scorer press applied every `compression_interval` decoding steps to
a buffer of recent hidden states, keeping `target_size` entries): here the `window` most recent decoded tokens'
rotated queries are captured by the attention hook, `ScorerMethod.decode_scores` scores every cached entry of each
head with them (prompt entries kept at prefill and decoded tokens alike), those `window` newest entries are always
kept (as SnapKV keeps its observation window), and the top `budget` entries per head stay. Positions are tracked as
at prefill, so the next token still goes to its true position. Between two evictions a head holds at most
budget + interval entries; with the budget above the total length nothing is ever evicted and the output is the
uncompressed one. Sliding-window layers are left alone, as at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DapqError
from ..methods.base import ScorerMethod
from ..methods.protocols import layer_budget
from ..methods.scoring import select_topk
from .state import EngineState


@dataclass(frozen=True)
class DecodeCompression:
    """Evict back to the method's budget every `interval` decoded tokens, scoring with the `window` most recent
    decoded tokens' queries (window <= interval; those tokens are kept)."""

    interval: int = 64
    window: int = 16

    def __post_init__(self) -> None:
        for name in ("interval", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DapqError(f"decode-time compression: {name} must be an integer >= 1; got {value!r}")
        if self.window > self.interval:
            raise DapqError(
                f"decode-time compression: window ({self.window}) must not exceed interval ({self.interval}): the "
                "window's queries are the tokens decoded since the last eviction."
            )


def check_decode_method(state: EngineState, dc: DecodeCompression) -> None:
    """Only scoring methods can re-score during decoding; the budget must hold the window."""
    method = state.method
    if not isinstance(method, ScorerMethod):
        raise DapqError(
            f"{method.name} cannot compress during decoding: decode-time compression re-scores with a scoring "
            "method's scores (snapkv, pyramidkv, dapq, learned, speckv, h2o, expected_attention)."
        )
    if method.budget is None:
        raise DapqError(f"{method.name} has no budget to keep during decoding: pass budget=.")
    if any(b <= dc.window for b in state.budget_list):
        raise DapqError(
            f"decode-time compression keeps the {dc.window} newest tokens inside the budget: the budget must exceed "
            f"the window ({dc.window})."
        )


class DecodeEvictor:
    """Called once per decoded token (`step`); evicts every `interval` tokens. If the caller started capturing
    before appending tokens after the compressed prompt (`EngineState.start_capture`, as `generate` in
    question-agnostic mode and `Chat` do), those tokens' queries re-score the cache at once, so no head ever holds
    more than budget + interval entries while decoding."""

    def __init__(self, state: EngineState, dc: DecodeCompression):
        check_decode_method(state, dc)
        self.state, self.dc = state, dc
        self.row_budgets = [state.method.budget_tokens(n) for n in state.length_list]
        self.since = 0  # tokens fed since the last eviction
        self.evictions = 0
        self.max_entries = 0  # the most entries any head held (checked against budget + interval)
        if state.capture is None:
            state.start_capture()
        elif any(state.capture):
            # tokens appended after the compressed prompt (a question, a turn) were captured: re-score now, so
            # decoding starts within the budget (kvpress evicts at the end of prefill as well)
            self.evict()

    def budgets(self, layer_idx: int) -> list[int]:
        """Entries kept per head by the layer: the method's budget (a ratio: of the prompt), not capped at the
        prompt's length as at prefill, through its per-layer schedule."""
        s = self.state
        return [layer_budget(s.method, b, layer_idx, s.n_layers, n) for b, n in zip(self.row_budgets, s.length_list)]

    def step(self) -> None:
        """After a forward that fed one token per row."""
        self.since += 1
        s = self.state
        assert s.capture is not None
        self.max_entries = max(self.max_entries, max(layer.keys.shape[2] for layer in s.cache.layers))
        for queries in s.capture:  # only the window's queries are ever needed
            if len(queries) > self.dc.window:
                del queries[: len(queries) - self.dc.window]
        if self.since >= self.dc.interval:
            self.evict()

    def evict(self) -> None:
        s = self.state
        evicted = False
        for i in range(s.n_layers):
            track, layer = s.tracks[i], s.cache.layers[i]
            if track is None or s.info.sliding[i] or not s.capture or not s.capture[i]:
                continue
            budgets = torch.tensor(self.budgets(i), device=layer.keys.device)
            if int(track.valid.sum(-1).max()) <= int(budgets.min()):
                continue  # every head within its budget already
            queries = torch.cat(s.capture[i], dim=2)[:, :, -self.dc.window :]  # [B, H_q, w, D]
            w = queries.shape[2]
            q_pos = track.pos[:, :, -w:]  # [B, H_s, w]: the newest entries are the window's own tokens
            visible = track.valid[:, :, None, :] & (track.pos[:, :, None, :] <= q_pos[..., None])  # [B, H_s, w, T]
            scaling = s.capture_scaling[i] or queries.shape[-1] ** -0.5
            assert isinstance(s.method, ScorerMethod)
            scores = s.method.decode_scores(queries, layer.keys, visible, scaling)  # [B, H_c, T]
            scores = scores.clone()
            scores[..., -w:] = float("inf")  # the window's own tokens stay
            valid = track.valid.expand(-1, scores.shape[1], -1)
            scores = scores.masked_fill(~valid, float("-inf"))
            idx, kept_valid = select_topk(scores, budgets)
            s.keep_tokens(i, idx, kept_valid)
            evicted = True
        self.since = 0
        self.evictions += int(evicted)
