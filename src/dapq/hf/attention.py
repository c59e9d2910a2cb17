"""The attention hook: an attention function registered with transformers' AttentionInterface under "dapq".

Nothing is patched at import time. `enable()` registers the function (idempotent); `activate(model, state)` switches
a model to it for the duration of a `with` block and restores the model's own implementation afterwards. Inside,
every attention call of every layer comes here with rotated queries [B, H_q, q, D] and the layer's full keys/values
[B, H_c, T, D] (cache included). We build the mask ourselves from the tracked positions and validity of the cached
entries (no mask function is registered for "dapq", so transformers hands us `attention_mask=None` and builds none),
delegate the attention itself to the model's own backend (sdpa, eager, or flash when no custom mask is needed), and,
during the prefill step, let the method select the kept prompt tokens and prune this layer's cache right after the
layer's output was computed with the full keys: the full KV of all layers never coexists.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..methods.base import LayerInputs, Method
from .cache import LayerTrack, gather_tokens, set_layer

ATTN_NAME = "dapq"
_STATE: contextvars.ContextVar[EngineState | None] = contextvars.ContextVar("dapq_state", default=None)


@dataclass
class Step:
    """The tokens of one forward call: position ids and validity [B, q]; `prompt_len` set for the prefill step."""

    pos: torch.Tensor  # [B, q] long
    valid: torch.Tensor  # [B, q] bool
    prompt_len: int | None = None  # T (padded prompt length) during the compressing prefill, else None
    all_valid: bool = field(init=False)
    contiguous: bool = field(init=False)  # positions increase by exactly 1 along the step

    def __post_init__(self) -> None:  # computed once per step, not per layer (each bool() is a device sync)
        self.all_valid = bool(self.valid.all())
        q = self.pos.shape[1]
        self.contiguous = q == 1 or bool((self.pos[:, 1:] - self.pos[:, :-1] == 1).all())


@dataclass
class EngineState:
    """Everything the hook needs that transformers no longer passes: the cache, the method, the current step."""

    cache: DynamicCache
    method: Method
    n_layers: int
    inner: str  # the model's own attention implementation ("sdpa", "eager", "flash_attention_2", ...)
    row_budgets: torch.Tensor  # [B] long, token budget per row (before per-layer adjustment)
    row_lengths: torch.Tensor  # [B] long, real prompt tokens per row
    sliding: list[bool]  # per layer: sliding-window layer (never evicted)
    tracks: list[LayerTrack | None] = field(default_factory=list)
    step: Step | None = None
    prefill_mask: torch.Tensor | None = None  # cached [B, 1, S, S] bool for the prefill step
    prefill_mask_ready: bool = False
    configs: list[Any] = field(default_factory=list)  # model configs whose attention implementation we switch
    kept: list[float] = field(default_factory=list)  # mean real tokens kept per head, per layer (after prefill)
    observed: list[Any] = field(default_factory=list)  # deferred methods (LAQ): per-layer prefill observations
    capture: list[list[torch.Tensor]] | None = None  # when set, decode steps record each layer's queries here

    def __post_init__(self) -> None:
        self.tracks = [None] * self.n_layers
        self.kept = [0.0] * self.n_layers
        self.observed = [None] * self.n_layers
        self._budget_list = [int(b) for b in self.row_budgets.tolist()]  # host copies: no per-layer device sync
        self._length_list = [int(n) for n in self.row_lengths.tolist()]

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keep only batch rows `idx` [A] of the cache, the tracks and the per-row bookkeeping."""
        for i, layer in enumerate(self.cache.layers):
            rows = idx.to(layer.keys.device)
            set_layer(layer, layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
            track = self.tracks[i]
            if track is not None:
                self.tracks[i] = LayerTrack(track.pos.index_select(0, rows), track.valid.index_select(0, rows))
        self.row_budgets = self.row_budgets.index_select(0, idx.to(self.row_budgets.device))
        self.row_lengths = self.row_lengths.index_select(0, idx.to(self.row_lengths.device))
        self._budget_list = [int(b) for b in self.row_budgets.tolist()]
        self._length_list = [int(n) for n in self.row_lengths.tolist()]

    def set_step(self, step: Step) -> None:
        self.step = step
        self.prefill_mask = None
        self.prefill_mask_ready = False


def enable() -> None:
    """Register dapq's attention function with transformers (safe to call many times)."""
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_NAME, dapq_attention)


def _configs(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen[id(cfg)] = cfg
    return list(seen.values())


def model_attn_implementation(model_or_module: Any) -> str:
    """The implementation dapq delegates to: the model's (or module's) own, or sdpa if it was switched to dapq."""
    impl = getattr(model_or_module.config, "_attn_implementation", None) or "sdpa"
    return "sdpa" if impl == ATTN_NAME else impl


@contextlib.contextmanager
def activate(model: Any, state: EngineState) -> Iterator[EngineState]:
    """Route the model's attention through dapq for the `with` block; restore everything afterwards."""
    enable()
    if not state.configs:
        state.configs = _configs(model)
    with switched(state.configs, ATTN_NAME, _STATE, state):
        yield state


@contextlib.contextmanager
def switched(configs: list[Any], name: str, var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    """Set every config's attention implementation to `name` and `var` to `value` for the block; restore both."""
    saved = [cfg._attn_implementation_internal for cfg in configs]
    token = var.set(value)
    try:
        for cfg in configs:
            cfg._attn_implementation_internal = name
        yield
    finally:
        for cfg, impl in zip(configs, saved):
            cfg._attn_implementation_internal = impl
        var.reset(token)


class _OneGroup:
    """A view of an attention module whose KV is already repeated per query head (query_head layout)."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _inner_attention(name: str, module: torch.nn.Module, mask_needed: bool):
    if name == "eager" or name.endswith("|eager"):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager, "eager"
        name = "sdpa"
    if name.startswith("flash") and not mask_needed:
        return ALL_ATTENTION_FUNCTIONS[name], "flash"
    return ALL_ATTENTION_FUNCTIONS["sdpa"], "sdpa"


def _visible(
    q_pos: torch.Tensor,  # [B, q]
    k_pos: torch.Tensor,  # [B, H_s, T]
    k_valid: torch.Tensor,  # [B, H_s, T]
    window: int | None,
) -> torch.Tensor:  # [B, H_s, q, T] bool
    vis = k_valid[:, :, None, :] & (k_pos[:, :, None, :] <= q_pos[:, None, :, None])
    if window is not None:
        vis &= k_pos[:, :, None, :] > (q_pos[:, None, :, None] - window)
    return vis


def _prefill_mask(state: EngineState, window: int | None, force: bool = False) -> torch.Tensor | None:
    """[B, 1, S, S] bool, or None for plain causal attention (never None with `force`: eager has no is_causal)."""
    step = state.step
    assert step is not None
    s = step.pos.shape[1]
    monotone = bool((step.pos[:, 1:] > step.pos[:, :-1]).all()) if s > 1 else True
    has_pads = not step.all_valid
    needs_window = window is not None and int((step.pos.max(-1).values - step.pos.min(-1).values).max()) >= window
    if monotone and not has_pads and not needs_window and not force:
        return None  # plain causal attention: let the backend use is_causal
    seq = torch.arange(s, device=step.pos.device)
    vis = _visible(step.pos, step.pos[:, None, :], step.valid[:, None, :], window)  # [B, 1, S, S]
    vis &= seq[None, None, None, :] <= seq[None, None, :, None]  # causal by sequence order too
    vis |= torch.eye(s, dtype=torch.bool, device=vis.device)  # a pad query attends to itself (no NaN rows)
    return vis


def _layer_window(module: torch.nn.Module, kwargs: dict[str, Any]) -> int | None:
    window = kwargs.get("sliding_window")
    if window is None:
        layer_types = getattr(module.config, "layer_types", None)
        if layer_types and layer_types[module.layer_idx] == "sliding_attention":
            window = getattr(module.config, "sliding_window", None)
    return int(window) if window else None


def dapq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H_q, q, D] rotated
    key: torch.Tensor,  # [B, H_c, T, D] rotated, cache included
    value: torch.Tensor,  # [B, H_c, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function. Without an active dapq state it behaves as plain causal attention."""
    state = _STATE.get()
    groups = query.shape[1] // key.shape[1]
    target = module if groups == getattr(module, "num_key_value_groups", groups) else _OneGroup(module)
    if state is None or state.step is None:
        fn, _ = _inner_attention(model_attn_implementation(module), module, attention_mask is not None)
        return fn(target, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    layer_idx = module.layer_idx
    step = state.step
    dev = key.device  # with device_map, layers live on different devices: bring our bookkeeping to this one
    window = _layer_window(module, kwargs)
    if step.prompt_len is not None:  # the compressing prefill step
        if not state.prefill_mask_ready or window is not None:
            eager = _inner_attention(state.inner, module, True)[1] == "eager"  # eager treats None as "see all"
            mask = _prefill_mask(state, window, force=eager)
            if window is None:
                state.prefill_mask, state.prefill_mask_ready = mask, True
        else:
            mask = state.prefill_mask
    else:
        track = state.tracks[layer_idx]
        assert track is not None, "decode step before prefill"
        track.append(step.pos.to(dev), step.valid.to(dev), step.all_valid)
        if state.capture is not None:
            state.capture[layer_idx].append(query)  # [B, H_q, q, D] rotated
        q = step.pos.shape[1]
        if q == 1 and window is None and track.all_valid:
            mask = None
        else:
            mask = _visible(step.pos.to(dev), track.pos, track.valid, window)  # [B, H_s, q, T]
            new = torch.arange(q, device=mask.device)
            mask[..., -q:] |= new[:, None] == new[None, :]  # every query sees itself (pad queries too)
    if mask is not None:
        mask = mask.to(query.device)
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):
        mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)  # [B, H_q, q, T]
    # flash kernels infer packed sequences from position jumps: use them only for plain causal, contiguous steps
    plain = mask is None and step.contiguous
    fn, kind = _inner_attention(state.inner, module, not plain)
    if mask is not None and kind == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    out, weights = fn(target, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    if step.prompt_len is not None:
        _compress_layer(state, module, query, key, value, scaling)
    return out, weights


def _compress_layer(
    state: EngineState,
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H_q, T+N, D]
    key: torch.Tensor,  # [B, H_c, T+N, D]
    value: torch.Tensor,  # [B, H_c, T+N, D]
    scaling: float | None,
) -> None:
    """The prefill hook's side of `apply_selection`: wrap this layer's step tensors into LayerInputs."""
    step = state.step
    assert step is not None and step.prompt_len is not None
    inp = LayerInputs(
        queries=query,
        keys=key,
        positions=step.pos.to(key.device),
        valid=step.valid.to(key.device),
        budgets=torch.empty(0),  # set by apply_selection
        prompt_len=step.prompt_len,
        scaling=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        layer_idx=module.layer_idx,
        n_layers=state.n_layers,
    )
    apply_selection(state, inp, value, step.all_valid)


def apply_selection(state: EngineState, inp: LayerInputs, value: torch.Tensor, all_valid: bool | None = None) -> None:
    """Select one layer's kept prompt tokens with `state.method`, store them in `state.cache`, drop the rest and
    every pseudo entry, and record positions/validity. `inp.keys` and `value` are [B, H_c, T(+N), D].

    Used by the prefill hook (layer by layer) and by the one-prefill evaluation path (from recorded inputs).
    """
    t, layer_idx = inp.prompt_len, inp.layer_idx
    key = inp.keys
    layer = state.cache.layers[layer_idx]
    method = state.method
    lengths = state._length_list
    budget_list = [
        min(method.layer_budget(b, layer_idx, state.n_layers, n), n) for b, n in zip(state._budget_list, lengths)
    ]
    inp.budgets = torch.tensor(budget_list, device=key.device)  # [B]
    pos, valid = inp.positions, inp.valid  # [B, T+N]
    # Hybrid models' sliding-window layers (config.layer_types) are left alone; a model whose every layer has a
    # window (Mistral v0.1) is evicted normally and the window is applied by the mask.
    evict = method.compresses and not state.sliding[layer_idx] and any(b < n for b, n in zip(budget_list, lengths))
    if not evict or method.deferred:  # deferred methods (LAQ) keep the full prompt KV until their later stage
        set_layer(layer, key[:, :, :t], value[:, :, :t])
        state.tracks[layer_idx] = LayerTrack(pos[:, None, :t], valid[:, None, :t], all_valid)
        state.kept[layer_idx] = sum(lengths) / len(lengths)
        if evict:
            state.observed[layer_idx] = method.observe(inp)
        return
    idx, kept_valid = method.select(inp, inp.budgets)  # [B, H_c, k], [B, H_c, k]
    set_layer(layer, gather_tokens(key, idx), gather_tokens(value, idx))
    prompt_pos = pos[:, None, :t].expand(-1, idx.shape[1], -1)  # [B, H_c, T]
    state.tracks[layer_idx] = LayerTrack(prompt_pos.gather(-1, idx), kept_valid)
    state.kept[layer_idx] = float(kept_valid.sum(-1).float().mean())
