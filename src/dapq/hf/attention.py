"""The attention hook: an attention function registered with transformers' AttentionInterface under "dapq".

Nothing is patched at import time. `enable()` registers the function (idempotent); `activate(configs, state)`
switches a model to it for the duration of a `with` block and restores the model's own implementation afterwards.
Inside, every attention call of every layer comes here with rotated queries [B, H_q, q, D] and the layer's full
keys/values [B, H_c, T, D] (cache included). We build the mask ourselves from the tracked positions and validity of
the cached entries (no mask function is registered for "dapq", so transformers hands us `attention_mask=None` and
builds none), delegate the attention itself to the model's own backend (sdpa, eager, or flash when no custom mask is
needed), and, during the prefill step, call the engine's `state.prefill_layer(...)` right after the layer's output
was computed with the full keys, so the engine prunes this layer before the next one runs: the full KV of all layers
never coexists. This module knows nothing about methods or selection: the engine state is a `HookState`.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import LayerTrack

ATTN_NAME = "dapq"
_STATE: contextvars.ContextVar[HookState | None] = contextvars.ContextVar("dapq_state", default=None)


@dataclass
class Step:
    """The tokens of one forward call: position ids and validity [B, q]; `prompt_len` set for the prefill step."""

    pos: torch.Tensor  # [B, q] long
    valid: torch.Tensor  # [B, q] bool
    prompt_len: int | None = None  # T (padded prompt length) during the compressing prefill, else None
    all_valid: bool = field(init=False)
    contiguous: bool = field(init=False)  # positions increase by exactly 1 along the step
    prefill_mask: torch.Tensor | None = field(init=False, default=None)  # [B, 1, S, S] bool, shared by the layers
    prefill_mask_ready: bool = field(init=False, default=False)

    def __post_init__(self) -> None:  # computed once per step, not per layer (each bool() is a device sync)
        self.all_valid = bool(self.valid.all())
        q = self.pos.shape[1]
        self.contiguous = q == 1 or bool((self.pos[:, 1:] - self.pos[:, :-1] == 1).all())


class HookState(Protocol):
    """What the attention function reads from the engine's state (`dapq.engine.state.EngineState` implements it)."""

    step: Step | None
    inner: str  # the model's own attention implementation ("sdpa", "eager", "flash_attention_2", ...)
    tracks: list[LayerTrack | None]  # per layer: positions and validity of the cached entries
    capture: list[list[torch.Tensor]] | None  # when set, decode steps record each layer's queries here
    capture_scaling: list[float | None]  # and each layer's attention scaling

    def prefill_layer(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, H_q, T+N, D]
        key: torch.Tensor,  # [B, H_c, T+N, D]
        value: torch.Tensor,  # [B, H_c, T+N, D]
        scaling: float | None,
    ) -> None:
        """Called once per layer of the compressing prefill, after the layer's attention output was computed."""


def enable() -> None:
    """Register dapq's attention function with transformers (safe to call many times)."""
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_NAME, dapq_attention)


def attention_configs(model: Any) -> list[Any]:
    """Every distinct config of the model whose attention implementation `activate` switches."""
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
def activate(configs: list[Any], state: HookState) -> Iterator[HookState]:
    """Route attention through dapq for the `with` block (`configs`: `attention_configs(model)`); restore after."""
    enable()
    with switched(configs, ATTN_NAME, _STATE, state):
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


def _prefill_mask(step: Step, window: int | None, force: bool = False) -> torch.Tensor | None:
    """[B, 1, S, S] bool, or None for plain causal attention (never None with `force`: eager has no is_causal)."""
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
        if not step.prefill_mask_ready or window is not None:
            eager = _inner_attention(state.inner, module, True)[1] == "eager"  # eager treats None as "see all"
            mask = _prefill_mask(step, window, force=eager)
            if window is None:
                step.prefill_mask, step.prefill_mask_ready = mask, True
        else:
            mask = step.prefill_mask
    else:
        track = state.tracks[layer_idx]
        assert track is not None, "decode step before prefill"
        track.append(step.pos.to(dev), step.valid.to(dev), step.all_valid)
        if state.capture is not None:
            state.capture[layer_idx].append(query)  # [B, H_q, q, D] rotated
            state.capture_scaling[layer_idx] = scaling if scaling is not None else query.shape[-1] ** -0.5
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
        state.prefill_layer(module, query, key, value, scaling)
    return out, weights
