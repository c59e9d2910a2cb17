"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keep the first `sinks` real prompt tokens (the attention sinks, 4 in the paper) and the most recent B - sinks
tokens; no scoring. By default kept keys keep their original RoPE positions and decoding continues at position L,
like every other method here. `rerotate=True` reproduces the paper's streaming setting: the engine re-rotates the
kept keys to contiguous positions 0 .. B-1 (`dapq.hf.rope`) and decoding continues at position B.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy import torch
from .base import LayerInputs, Method, positive_int, register
from .protocols import PositionPolicy
from .scoring import select_topk


def real_token_index(valid: torch.Tensor) -> torch.Tensor:  # [B, T] long
    """Index of every token among its row's real tokens (0 for the first real token; pads get -1)."""
    return torch.cumsum(valid.long(), dim=-1) - 1


@register("streamingllm")
@dataclass
class StreamingLLM(Method, PositionPolicy):
    """StreamingLLM: the first `sinks` tokens (attention sinks) plus the most recent tokens, no scoring.

    Fields: `sinks` (4, the paper's setting), `rerotate` (False: keep original positions; True: move kept keys to
    positions 0 .. B-1 and decode from B, as the original paper), plus the base fields (budget, layout; `gqa` is
    unused: every head keeps the same tokens).

    Shapes: keys [B, H_c, T, D] of one layer (only their head count is used); returns kept indices [B, H_c, B_tokens]:
    per row, min(sinks, B) first real tokens and the last B - sinks real tokens.
    """

    sinks: int = 4
    rerotate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("sinks", self.sinks, minimum=0)

    @property
    def min_budget(self) -> int:
        return self.sinks + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (f"its {self.sinks} sink tokens", "sinks", "Lower sinks or raise the budget.")

    @property
    def renumbers_positions(self) -> bool:
        return self.rerotate

    def scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_c, T]
        """Sinks +inf, then recency (the real-token index), pads -inf: the top-B are exactly sinks + recent."""
        t = inp.prompt_len
        valid = inp.valid[:, :t]  # [B, T]
        u = real_token_index(valid)  # [B, T]
        s = u.float().masked_fill(u < self.sinks, float("inf"))  # stable top-k keeps the earliest sinks first
        s = s.masked_fill(~valid, float("-inf"))  # [B, T]
        return s[:, None, :].expand(-1, inp.keys.shape[1], -1)

    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_topk(self.scores(inp), budgets)
