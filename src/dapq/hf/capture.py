"""Capturing queries and keys with plain transformers attention, for the analysis suite (`dapq analyze ...`).

`capture_queries(model)` is a context manager that routes every attention call through a capturing function
registered with transformers (`dapq_capture_sdpa` / `dapq_capture_eager`, each with that implementation's own mask
function registered under the same name), which records each layer's rotated queries and its attention scaling and
then calls the model's own attention: outputs are unchanged. Nothing is patched at import time.

On top of it, a small API over a plain `DynamicCache` of the full prompt:

    state = prefill_prompt(model, prompt_ids, keep_last=128)   # full prompt KV, last 128 prompt queries per layer
    answer = greedy_answer(model, state, 128, stop_ids)        # the model's own greedy answer (token ids)
    real = queries_at(model, state, answer, range(L, L + len(answer)))   # teacher-forced decoding queries
    fake = queries_at(model, state, other_ids, range(0, 32))   # any content at any positions
    pre = to_pre_rope(model, real.queries, real.positions)     # the same queries before RoPE
    probs = suffix_attention(model, state, embeds, range(L, L + n))  # differentiable attention of input embeddings

Appended tokens follow the prompt in sequence order whatever position ids they get, so they see the whole prompt
(the standard causal mask of an HF forward with explicit position ids), and the cache is cut back afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import DapqError
from .adapters import SuffixAdapters, suffix_adapters
from .attention import attention_configs, model_attn_implementation, switched

_RECORD: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("dapq_capture", default=None)


@dataclass
class _Record:
    n_layers: int
    keep_last: int | None
    queries: list[list[torch.Tensor]]  # per layer, per forward call: [B, H_q, q, D] rotated
    scaling: list[float]


def _capture_fn(inner: str):
    def capture(
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, H_q, q, D] rotated
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rec = _RECORD.get()
        if rec is not None:
            q = query if rec.keep_last is None else query[:, :, -rec.keep_last :]
            rec.queries[module.layer_idx].append(q.detach().float().clone())
            rec.scaling[module.layer_idx] = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        return ALL_ATTENTION_FUNCTIONS[inner](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return capture


def _register(inner: str) -> str:
    name = f"dapq_capture_{inner}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capture_fn(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def n_layers(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


@contextlib.contextmanager
def capture_queries(model: Any, keep_last: int | None = None) -> Iterator[_Record]:
    """Record every layer's rotated queries (the last `keep_last` of each call, or all) inside the block."""
    impl = model_attn_implementation(model)
    inner = "eager" if impl == "eager" or impl.endswith("|eager") else "sdpa"
    if inner == "eager" and "eager" not in ALL_ATTENTION_FUNCTIONS:
        inner = "sdpa"
    name = _register(inner)
    layers = n_layers(model)
    rec = _Record(layers, keep_last, [[] for _ in range(layers)], [0.0] * layers)
    with switched(attention_configs(model), name, _RECORD, rec):
        yield rec


@dataclass
class PromptState:
    """A fully prefilled prompt (batch of one): its cache, last-token logits and its last prompt queries."""

    cache: DynamicCache
    length: int  # L
    first_logits: torch.Tensor  # [V] logits of the last prompt token
    prompt_queries: list[torch.Tensor]  # per layer [H_q, w, D] rotated: the last `keep_last` prompt queries
    scaling: list[float]  # per layer attention scaling

    def keys(self, layer: int) -> torch.Tensor:  # [H_kv, L, D] rotated prompt keys
        return self.cache.layers[layer].keys[0, :, : self.length].float()

    def values(self, layer: int) -> torch.Tensor:  # [H_kv, L, D]
        return self.cache.layers[layer].values[0, :, : self.length].float()


@dataclass
class CapturedQueries:
    queries: list[torch.Tensor]  # per layer [H_q, n, D] rotated
    positions: torch.Tensor  # [n] long
    token_ids: list[int]


def _device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def prefill_prompt(model: Any, prompt_ids: list[int], keep_last: int = 128) -> PromptState:
    """Prefill the prompt once with the full cache, keeping its last `keep_last` queries per layer."""
    if not prompt_ids:
        raise DapqError("Empty prompt: the analysis needs at least one prompt token.")
    device = _device(model)
    ids = torch.tensor([prompt_ids], device=device)
    pos = torch.arange(len(prompt_ids), device=device)[None]
    cache = DynamicCache()
    with capture_queries(model, keep_last=keep_last) as rec, torch.inference_mode():
        out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    queries = [torch.cat(q, dim=2)[0] for q in rec.queries]
    return PromptState(cache, len(prompt_ids), out.logits[0, -1].float(), queries, list(rec.scaling))


def _cut(cache: DynamicCache, length: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def queries_at(model: Any, state: PromptState, token_ids: list[int], positions: Iterable[int]) -> CapturedQueries:
    """Feed `token_ids` after the prompt (sequence order) at the given position ids; return their queries.

    The tokens see the whole prompt and each other causally; the prompt cache is left as it was."""
    pos_list = [int(p) for p in positions]
    if len(pos_list) != len(token_ids) or not token_ids:
        raise DapqError(
            f"queries_at needs one position per token; got {len(token_ids)} tokens, {len(pos_list)} positions"
        )
    device = _device(model)
    ids = torch.tensor([list(token_ids)], device=device)
    pos = torch.tensor([pos_list], device=device)
    try:
        with capture_queries(model) as rec, torch.inference_mode():
            model(input_ids=ids, position_ids=pos, past_key_values=state.cache, use_cache=True, logits_to_keep=1)
    finally:
        _cut(state.cache, state.length)
    return CapturedQueries([torch.cat(q, dim=2)[0] for q in rec.queries], pos[0].cpu(), list(token_ids))


def greedy_answer(
    model: Any, state: PromptState, max_new_tokens: int, stop_ids: set[int], suppress_ids: set[int] | None = None
) -> list[int]:
    """The model's own greedy continuation of the prompt (full cache), up to `max_new_tokens` tokens.

    `suppress_ids` are never chosen (the analysis suppresses end-of-turn tokens to get answers of a fixed length)."""
    banned = torch.tensor(sorted(suppress_ids or []), dtype=torch.long)
    device = _device(model)
    tokens: list[int] = []
    logits = state.first_logits
    try:
        for step in range(max_new_tokens):
            if len(banned):
                logits = logits.index_fill(0, banned.to(logits.device), float("-inf"))
            tok = int(logits.argmax())
            if tok in stop_ids:
                break
            tokens.append(tok)
            if step == max_new_tokens - 1:
                break
            with torch.inference_mode():
                out = model(
                    input_ids=torch.tensor([[tok]], device=device),
                    position_ids=torch.tensor([[state.length + step]], device=device),
                    past_key_values=state.cache,
                    use_cache=True,
                )
            logits = out.logits[0, -1].float()
    finally:
        _cut(state.cache, state.length)
    return tokens


def to_pre_rope(model: Any, queries: list[torch.Tensor], positions: torch.Tensor) -> list[torch.Tensor]:
    """Undo RoPE: rotate queries [H_q, n, D] taken at `positions` [n] back to position 0 (identity rotation).

    Exact for plain RoPE; with a RoPE attention factor the result is scaled by it, which cosines ignore."""
    from .rope import rerotate_keys, rotary_module

    rotary = rotary_module(model)
    out = []
    for q in queries:
        h, n, _ = q.shape
        old = positions.to(q.device)[None, None, :].expand(1, h, n)
        out.append(rerotate_keys(rotary, q[None], old, torch.zeros_like(old))[0])
    return out


# ---------------------------------------------------------------------------------------------------- training
_PROBS: contextvars.ContextVar[list[torch.Tensor | None] | None] = contextvars.ContextVar("dapq_probs", default=None)
_PROBS_NAME = "dapq_attention_probs"


def _probs_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H_q, q, D]
    key: torch.Tensor,  # [B, H_kv, K, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (eager) attention that keeps its softmax probabilities [B, H_q, q, K] in the autograd graph."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : k.shape[-2]]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    rec = _PROBS.get()
    if rec is not None:
        rec[module.layer_idx] = probs
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def trainable(state: PromptState) -> PromptState:
    """The same prompt state with its cache tensors copied out of inference mode, so that forwards on top of it can
    be differentiated (the prompt KV stays constant: the model is frozen and the prompt comes first)."""
    for layer in state.cache.layers:
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return state


def suffix_attention(
    model: Any,
    state: PromptState,
    embeds: torch.Tensor,
    positions: Iterable[int],
    adapters: SuffixAdapters | None = None,
) -> list[torch.Tensor]:
    """Feed input embeddings [n, hidden] after the prompt (sequence order, the given position ids) through the model
    with differentiable eager attention; returns every layer's attention probabilities [H_q, n, L + n] (over the
    prompt keys, then the fed tokens' own keys, causal). Gradients reach `embeds` when it requires them (make the
    state `trainable` first and freeze the model's parameters), and to `adapters` (low-rank adapters acting on the fed
    rows only, `dapq.hf.adapters`) when theirs do; the prompt cache is left as it was."""
    pos = torch.tensor([[int(p) for p in positions]], device=embeds.device)
    if pos.shape[1] != embeds.shape[0]:
        raise DapqError(f"suffix_attention needs one position per embedding; got {embeds.shape[0]} and {pos.shape[1]}")
    if _PROBS_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_PROBS_NAME, _probs_attention)
        AttentionMaskInterface.register(_PROBS_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    rec: list[torch.Tensor | None] = [None] * n_layers(model)
    saved = [(layer.keys, layer.values) for layer in state.cache.layers]
    try:
        with (
            switched(attention_configs(model), _PROBS_NAME, _PROBS, rec),
            suffix_adapters(model, adapters, len(embeds)),
        ):
            model(
                inputs_embeds=embeds[None],
                position_ids=pos,
                past_key_values=state.cache,
                use_cache=True,
                logits_to_keep=1,
            )
    finally:
        for layer, (k, v) in zip(state.cache.layers, saved):
            layer.keys, layer.values = k, v
    if any(p is None for p in rec):
        raise DapqError("suffix_attention saw a layer without attention probabilities (an unsupported architecture).")
    return [p[0] for p in rec]  # type: ignore[index]
