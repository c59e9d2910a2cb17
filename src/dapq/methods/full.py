"""FullKV: no eviction. The reference for every accuracy table; also the no-op path of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..lazy import torch
from .base import LayerInputs, Method, register


@register("full")
@dataclass
class FullKV(Method):
    """Keep every prompt token. `budget` is accepted (so sweeps can pass one) and ignored."""

    evicts: ClassVar[bool] = False

    @property
    def compresses(self) -> bool:
        return False

    def token_budget(self, prompt_len: int) -> int:
        return prompt_len

    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("FullKV never selects")  # the engine keeps everything when `compresses` is False
