"""Re-rotating cached keys to new RoPE positions (StreamingLLM's `rerotate` option).

A cached key was rotated at its original position p; RoPE rotations compose, R(p') = R(p' - p) R(p), so rotating
it by the angle of (p' - p) with the model's own rotary embedding moves it to position p'. Only the first
`cos.shape[-1]` dims are rotated (partial rotary models), with transformers' rotate_half convention
(`dapq.methods.scoring.rotate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import DapqError
from ..methods.scoring import rotate


def rotary_modules(model: Any) -> list[torch.nn.Module]:
    """Every rotary embedding module of the model (transformers names them `...rotary_emb`)."""
    return [m for name, m in model.named_modules() if name.endswith("rotary_emb")]


def rotary_module(model: Any) -> torch.nn.Module:
    """The model's (single) rotary embedding module."""
    found = rotary_modules(model)
    if len(found) != 1:
        raise DapqError(
            f"Re-rotation needs exactly one rotary embedding module; {type(model).__name__} has {len(found)}. "
            "Use rerotate=False with this model."
        )
    return found[0]


def find_rotary(model: Any) -> torch.nn.Module | None:
    """The model's rotary embedding module when it has exactly one, else None."""
    found = rotary_modules(model)
    return found[0] if len(found) == 1 else None


def rotary_fn(rotary: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """positions [B, S] -> (cos, sin) [B, S, D_rot] of the model's rotary embedding (for `LayerInputs.rotary`)."""
    weight = next(iter(rotary.buffers()), None)

    def at(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=torch.float32, device=positions.device if weight is None else weight.device)
        cos, sin = rotary(probe, position_ids=positions.to(probe.device))
        return cos.float(), sin.float()

    return at


def rerotate_keys(
    rotary: torch.nn.Module,
    keys: torch.Tensor,  # [B, H, T, D] rotated at `old`
    old: torch.Tensor,  # [B, H, T] long
    new: torch.Tensor,  # [B, H, T] long
) -> torch.Tensor:  # [B, H, T, D] rotated at `new`
    b, h, t, d = keys.shape
    delta = (new - old).reshape(b * h, t)  # [B*H, T]
    cos, sin = rotary(keys, position_ids=delta)  # [B*H, T, D_rot]
    return rotate(keys, cos.reshape(b, h, t, -1), sin.reshape(b, h, t, -1))
