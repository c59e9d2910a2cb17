"""Re-rotating cached keys to new RoPE positions (StreamingLLM's `rerotate` option).

A cached key was rotated at its original position p; RoPE rotations compose, R(p') = R(p' - p) R(p), so rotating
it by the angle of (p' - p) with the model's own rotary embedding moves it to position p'. Only the first
`cos.shape[-1]` dims are rotated (partial rotary models), with transformers' rotate_half convention.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DapqError


def rotary_module(model: Any) -> torch.nn.Module:
    """The model's (single) rotary embedding module."""
    found = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if len(found) != 1:
        raise DapqError(
            f"Re-rotation needs exactly one rotary embedding module; {type(model).__name__} has {len(found)}. "
            "Use rerotate=False with this model."
        )
    return found[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate_keys(
    rotary: torch.nn.Module,
    keys: torch.Tensor,  # [B, H, T, D] rotated at `old`
    old: torch.Tensor,  # [B, H, T] long
    new: torch.Tensor,  # [B, H, T] long
) -> torch.Tensor:  # [B, H, T, D] rotated at `new`
    b, h, t, d = keys.shape
    delta = (new - old).reshape(b * h, t)  # [B*H, T]
    cos, sin = rotary(keys, position_ids=delta)  # [B*H, T, D_rot]
    cos = cos.reshape(b, h, t, -1).to(keys.dtype)
    sin = sin.reshape(b, h, t, -1).to(keys.dtype)
    rot = cos.shape[-1]
    k_rot, k_pass = keys[..., :rot], keys[..., rot:]
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat([k_rot, k_pass], dim=-1)
