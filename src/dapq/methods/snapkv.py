"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

The last `window` prompt tokens are the observation window. Their softmax attention (fp32, causal inside the
window, window keys in the denominator) is summed over the window queries for every earlier key, max-pooled
along the key axis (kernel 7), and the top (B - window) earlier keys are kept together with the window itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy import torch
from .base import LayerInputs, ScorerMethod, positive_int, recent_mask, register
from .scoring import window_attention


def window_scores(inp: LayerInputs, window: int) -> torch.Tensor:  # [B, H_q, T]
    """SnapKV's score of every prompt key from the last `window` prompt queries; window keys get 0 (kept anyway).

    Memoised in `inp.memo` (evaluation path) by window: SnapKV, PyramidKV and LAQ's stage 1 at every budget score
    with the same window. Callers must not modify the result in place."""
    t = inp.prompt_len
    w = min(window, t)
    key = ("window_scores", w)
    if inp.memo is not None and key in inp.memo:
        return inp.memo[key]
    q_slice, k_slice = slice(t - w, t), slice(0, t)
    probs = window_attention(
        inp.queries[:, :, q_slice], inp.keys[:, :, k_slice], inp.visible(q_slice, k_slice), inp.scaling
    )
    scores = probs.sum(dim=2)  # [B, H_q, T]
    scores[..., t - w :] = 0.0  # ranked only among the first T - w keys, as in the reference code
    if inp.memo is not None:
        inp.memo[key] = scores
    return scores


@register("snapkv")
@dataclass
class SnapKV(ScorerMethod):
    """SnapKV: the last `window` prompt queries score earlier keys; keep the top B - window plus the window.

    Fields: `window` (observation window W, kept in full; default 32 as in the DapQ paper), `pooling`
    and `kernel` (max, 7), plus the base fields (budget, layout, gqa).

    Shapes: queries [B, H_q, T, D] and keys [B, H_c, T, D] of one layer; returns kept indices [B, H_c, B_tokens].
    """

    window: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("window", self.window)

    @property
    def min_budget(self) -> int:
        return self.window + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (
            f"its {self.window}-token window",
            "window",
            f"Lower window (e.g. window={max(1, (self.budget or 4) // 4)}) or raise the budget.",
        )

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:
        return window_scores(inp, self.window)

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor:
        return recent_mask(inp, min(self.window, int(inp.budgets.min().item())))
