"""The state of one compressing forward and the per-layer selection step.

`EngineState.create(...)` is its one constructor (serving prefill, recording, replay, LAQ's stage-1 cache, merged
decode batches all go through it). The attention hook (`dapq.hf.attention`, which sees it as a `HookState`) calls
`prefill_layer` once per layer of the compressing prefill; `select_layer` then lets the method choose the kept
prompt tokens, stores them in the cache, drops the rest and every pseudo entry, and tracks positions/validity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..errors import DapqError
from ..hf.attention import Step
from ..hf.cache import LayerTrack, gather_tokens, make_cache, set_layer
from ..methods.base import Method
from ..methods.inputs import LayerInputs, layer_inputs
from ..methods.protocols import ContextPass, Staged, StageOneObservation, layer_budget
from .model_info import ModelInfo


@dataclass
class PassObservation:
    """What a context-pass layer (KVzip) keeps from prefill: its attention scaling and where its pass scores are
    memoised (a recording's memo in the harness, so every budget shares one pass). See `dapq.engine.context_pass`."""

    memo: dict[Any, Any]
    scaling: float


@dataclass
class EngineState:
    """Everything the hook needs that transformers no longer passes: the cache, the method, the current step.

    Build it with `EngineState.create`; change it only through its methods."""

    cache: DynamicCache
    method: Method
    info: ModelInfo
    row_budgets: torch.Tensor  # [B] long, token budget per row (before per-layer adjustment)
    row_lengths: torch.Tensor  # [B] long, real prompt tokens per row
    recording: bool = False  # keep the full prompt KV and every layer's LayerInputs (the evaluation path)
    tracks: list[LayerTrack | None] = field(default_factory=list)
    step: Step | None = None
    kept: list[float] = field(default_factory=list)  # mean real tokens kept per head, per layer (after prefill)
    # per layer, what a later step needs, None where nothing waits (or once consumed): the recorded LayerInputs (the
    # harness's recording), a staged method's stage-1 selection (LAQ), a context pass's scores memo (KVzip)
    recorded: list[LayerInputs | None] = field(default_factory=list)
    stage_one: list[StageOneObservation | None] = field(default_factory=list)
    pass_waiting: list[PassObservation | None] = field(default_factory=list)
    capture: list[list[torch.Tensor]] | None = None  # when set, decode steps record each layer's queries here
    capture_scaling: list[float | None] = field(default_factory=list)  # each layer's scaling, set by the hook

    @classmethod
    def create(
        cls,
        info: ModelInfo,
        method: Method,
        lengths: list[int],
        *,
        budgets: list[int] | torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        recording: bool = False,
    ) -> EngineState:
        """A fresh state for rows of `lengths` real prompt tokens: an empty cache of the method's layout (unless
        `cache` is given), budgets from the method unless given."""
        device = info.device
        if budgets is None:
            budgets = [method.token_budget(n) for n in lengths]
            for n, b in zip(lengths, budgets):
                if b < n and b < method.min_budget:  # a ratio budget too small for this prompt
                    raise DapqError(
                        f"{method.name}: budget {method.budget} of a {n}-token prompt is {b} tokens, fewer than the "
                        f"{method.min_budget} it needs (its window, sinks or recent tokens are kept inside the "
                        "budget). Raise the budget or shrink the window."
                    )
        row_budgets = budgets if isinstance(budgets, torch.Tensor) else torch.tensor(budgets, device=device)
        row_lengths = torch.tensor(lengths, device=device) if not isinstance(lengths, torch.Tensor) else lengths
        if cache is None:
            cache = make_cache(info.n_layers, method.layout, info.groups)
        return cls(cache, method, info, row_budgets.to(device), row_lengths.to(device), recording)

    def __post_init__(self) -> None:
        n = self.info.n_layers
        self.tracks = [None] * n
        self.kept = [0.0] * n
        self.recorded = [None] * n
        self.stage_one = [None] * n
        self.pass_waiting = [None] * n
        self._host_rows()

    def _host_rows(self) -> None:  # host copies: no per-layer device sync
        self.budget_list = [int(b) for b in self.row_budgets.tolist()]
        self.length_list = [int(n) for n in self.row_lengths.tolist()]

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def inner(self) -> str:
        return self.info.inner

    def set_step(self, step: Step | None) -> None:
        self.step = step

    def start_capture(self) -> None:
        """From now on, every decode step records each layer's rotated queries."""
        self.capture = [[] for _ in range(self.n_layers)]
        self.capture_scaling = [None] * self.n_layers

    def stop_capture(self) -> None:
        self.capture = None

    def captured_queries(self, layer_idx: int) -> torch.Tensor:  # [B, H_q, n, D]
        """The queries captured at `layer_idx` since `start_capture`, concatenated along the token axis."""
        assert self.capture is not None, "start_capture() first"
        return torch.cat(self.capture[layer_idx], dim=2)

    def set_track(self, layer_idx: int, track: LayerTrack, kept: float | None = None) -> None:
        """Replace a layer's tracked positions/validity (and its mean kept count)."""
        self.tracks[layer_idx] = track
        if kept is not None:
            self.kept[layer_idx] = kept

    def keep_tokens(self, layer_idx: int, idx: torch.Tensor, kept_valid: torch.Tensor) -> None:
        """Keep entries `idx` [B, H_c, k] (validity `kept_valid`) of a layer that still holds its full prompt: its
        keys, values and tracked positions are gathered (the second selection of LAQ and KVzip)."""
        layer, track = self.cache.layers[layer_idx], self.tracks[layer_idx]
        assert track is not None
        set_layer(layer, gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx))
        pos = track.pos.expand(-1, idx.shape[1], -1).gather(-1, idx)
        self.set_track(layer_idx, LayerTrack(pos, kept_valid), float(kept_valid.sum(-1).float().mean()))

    def take_stage_one(self, layer_idx: int) -> StageOneObservation | None:
        """A staged layer's stage-1 selection, once (None: the layer was not evicted)."""
        obs, self.stage_one[layer_idx] = self.stage_one[layer_idx], None
        return obs

    def take_pass(self, layer_idx: int) -> PassObservation | None:
        """A layer waiting for the context pass, once."""
        obs, self.pass_waiting[layer_idx] = self.pass_waiting[layer_idx], None
        return obs

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keep only batch rows `idx` [A] of the cache, the tracks and the per-row bookkeeping."""
        for i, layer in enumerate(self.cache.layers):
            rows = idx.to(layer.keys.device)
            set_layer(layer, layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
            track = self.tracks[i]
            if track is not None:
                self.tracks[i] = LayerTrack(track.pos.index_select(0, rows), track.valid.index_select(0, rows))
        if self.capture is not None:  # captured decode queries follow their rows (beam search reorders)
            self.capture = [[q.index_select(0, idx.to(q.device)) for q in layer] for layer in self.capture]
        self.row_budgets = self.row_budgets.index_select(0, idx.to(self.row_budgets.device))
        self.row_lengths = self.row_lengths.index_select(0, idx.to(self.row_lengths.device))
        self._host_rows()

    # ------------------------------------------------------------------------------------------------ prefill
    def prefill_layer(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, H_q, T+N, D]
        key: torch.Tensor,  # [B, H_c, T+N, D]
        value: torch.Tensor,  # [B, H_c, T+N, D]
        scaling: float | None,
    ) -> None:
        """The hook's callback: wrap this layer's step tensors into LayerInputs and select."""
        step = self.step
        assert step is not None and step.prompt_len is not None
        inp = layer_inputs(
            queries=query,
            keys=key,
            values=value,
            positions=step.pos,
            valid=step.valid,
            prompt_len=step.prompt_len,
            scaling=scaling,
            layer_idx=module.layer_idx,
            n_layers=self.n_layers,
            config=getattr(module, "config", None),
            rotary=self.info.rotary,
        )
        select_layer(self, inp, step.all_valid)

    def layer_budgets(self, layer_idx: int) -> list[int]:
        """Tokens kept per head by `layer_idx` for each row (the method's per-layer schedule, capped at the row)."""
        return [
            min(layer_budget(self.method, b, layer_idx, self.n_layers, n), n)
            for b, n in zip(self.budget_list, self.length_list)
        ]


def select_layer(state: EngineState, inp: LayerInputs, all_valid: bool | None = None) -> None:
    """Select one layer's kept prompt tokens with `state.method`, store them in `state.cache`, drop the rest and
    every pseudo entry, and record positions/validity. `inp.keys` and `inp.values` are [B, H_c, T(+N), D].

    Used by the prefill hook (layer by layer) and by the replay of a recording (`dapq.engine.replay.derive`).
    """
    t, layer_idx = inp.prompt_len, inp.layer_idx
    key, value = inp.keys, inp.values
    assert value is not None
    layer = state.cache.layers[layer_idx]
    method = state.method
    lengths = state.length_list
    budget_list = state.layer_budgets(layer_idx)
    inp.budgets = torch.tensor(budget_list, device=key.device)  # [B]
    pos, valid = inp.positions, inp.valid  # [B, T+N]
    # Hybrid models' sliding-window layers (config.layer_types) are left alone; a model whose every layer has a
    # window (Mistral v0.1) is evicted normally and the window is applied by the mask.
    sliding = state.info.sliding[layer_idx]
    if state.recording:
        evict = not sliding
    else:
        evict = method.compresses and not sliding and any(b < n for b, n in zip(budget_list, lengths))
    if not evict or state.recording or isinstance(method, (Staged, ContextPass)):  # the full prompt KV stays, for now
        set_layer(layer, key[:, :, :t], value[:, :, :t])
        state.set_track(
            layer_idx, LayerTrack(pos[:, None, :t], valid[:, None, :t], all_valid), sum(lengths) / len(lengths)
        )
        if evict and state.recording:
            state.recorded[layer_idx] = inp
        elif evict and isinstance(method, Staged):
            state.stage_one[layer_idx] = method.observe(inp)
        elif evict:  # a context pass follows (dapq.engine.context_pass); scores are memoised where inp says
            state.pass_waiting[layer_idx] = PassObservation(inp.memo if inp.memo is not None else {}, inp.scaling)
        return
    idx, kept_valid = method.select(inp, inp.budgets)  # [B, H_c, k], [B, H_c, k]
    set_layer(layer, gather_tokens(key, idx), gather_tokens(value, idx))
    prompt_pos = pos[:, None, :t].expand(-1, idx.shape[1], -1)  # [B, H_c, T]
    state.set_track(
        layer_idx, LayerTrack(prompt_pos.gather(-1, idx), kept_valid), float(kept_valid.sum(-1).float().mean())
    )
