"""What the engine needs to know about a model, read once per model: layers, heads, positions, sliding layers,
the attention configs the hook switches, the attention implementation it delegates to, the rotary embedding."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DapqError
from ..hf.attention import attention_configs, model_attn_implementation
from ..hf.rope import find_rotary, rotary_fn
from ..methods.inputs import Rotary


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def kv_groups(model: Any) -> int:
    """Query heads per KV head (the GQA group size G)."""
    cfg = text_config(model)
    return cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def model_device(model: Any) -> torch.device:
    """The device of the input embeddings (where prompts go)."""
    return model.get_input_embeddings().weight.device


def sync_device(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a clock read measures finished work; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_model(model: Any) -> None:
    """Refuse models the hook cannot serve, with a message that says why."""
    if not getattr(model, "_supports_attention_backend", False):
        raise DapqError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, which dapq "
            "hooks. Use a model class that supports attn_implementation (Llama, Mistral, Qwen2/3, Phi3, Gemma, ...)."
        )
    cfg = text_config(model)
    has_rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    has_rope = has_rope or any(name.endswith("rotary_emb") for name, _ in model.named_modules())
    if not has_rope:
        raise DapqError(
            f"{type(model).__name__} has no rotary position embeddings. dapq's methods keep the original RoPE "
            "positions of kept tokens (and DapQ places pseudo queries by position): use a RoPE model."
        )


@dataclass(frozen=True)
class ModelInfo:
    """The engine's view of one model (see `model_info`)."""

    n_layers: int
    groups: int  # GQA group size G = H_q / H_kv
    n_heads: int  # H_q
    head_dim: int
    max_positions: int | None
    sliding: tuple[bool, ...]  # per layer: a hybrid model's sliding-window layer (never evicted)
    inner: str  # the attention implementation the hook delegates to
    configs: tuple[Any, ...]  # configs whose attention implementation the hook switches
    vocab_size: int
    device: torch.device
    rotary: Rotary | None  # positions -> (cos, sin), None when the model has no single rotary module

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads // self.groups


_INFO: weakref.WeakKeyDictionary[Any, ModelInfo] = weakref.WeakKeyDictionary()


def model_info(model: Any) -> ModelInfo:
    """The `ModelInfo` of `model` (checked with `check_model`), computed once per model object."""
    info = _INFO.get(model)
    if info is not None and info.inner == model_attn_implementation(model) and info.device == model_device(model):
        return info
    check_model(model)
    cfg = text_config(model)
    n_layers = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    rotary = find_rotary(model)
    n_heads = cfg.num_attention_heads
    info = ModelInfo(
        n_layers=n_layers,
        groups=kv_groups(model),
        n_heads=n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        sliding=tuple(t == "sliding_attention" for t in types),
        inner=model_attn_implementation(model),
        configs=tuple(attention_configs(model)),
        vocab_size=model.get_input_embeddings().weight.shape[0],
        device=model_device(model),
        rotary=rotary_fn(rotary) if rotary is not None else None,
    )
    try:
        _INFO[model] = info
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return info
