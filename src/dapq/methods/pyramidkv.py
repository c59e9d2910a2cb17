"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069).

SnapKV scoring (the last `window` prompt queries score the earlier keys, max pool kernel 7, the window itself kept)
with a per-layer budget that decreases linearly with depth, as in the KVCache-Factory reference code (beta = 20):

    min = (B - W) // beta,  max = 2 (B - W) - min
    if max >= L - W:  max = L - W,  min = 2 (B - W) - max
    step = (max - min) // (n_layers - 1)
    layer l keeps  max - l * step  scored tokens plus the W window tokens.

The floor in `step` makes the mean kept per layer slightly above B: `pyramid_budgets` gives the real per-layer
counts (mean - B lies in [0, (n_layers - 1) / 2)). Every layer keeps at least W and at most L tokens.

Difference from the reference code, kept on purpose (the schedule above applies to every L > B): KVCache-Factory
falls back to the uniform SnapKV budget when L < 2 (B - W), where this schedule is clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DapqError
from .base import positive_int, register
from .protocols import LayerBudgetSchedule
from .snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, beta: int, n_layers: int, prompt_len: int) -> list[int]:
    """Tokens kept per head by each of `n_layers` layers for a prompt of `prompt_len` tokens and a budget `budget`.

    The beta schedule of PyramidKV (module docstring). Degenerate cases keep the uniform budget: a prompt that fits
    the budget (nothing is evicted), a budget with no room beyond the window (budget <= window), a single layer.
    """
    if n_layers < 1:
        raise DapqError(f"n_layers must be >= 1; got {n_layers}")
    if prompt_len <= budget:
        return [prompt_len] * n_layers
    if budget <= window or n_layers == 1:
        return [budget] * n_layers
    scored = budget - window  # B - W > 0
    lo = scored // beta
    hi = 2 * scored - lo
    if hi >= prompt_len - window:
        hi = prompt_len - window
        lo = 2 * scored - hi  # >= 0 because hi <= 2 (B - W); <= hi because B < L
    step = (hi - lo) // (n_layers - 1)
    return [hi - layer * step + window for layer in range(n_layers)]  # each in [W + lo, L]


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV, LayerBudgetSchedule):
    """PyramidKV: SnapKV scoring with per-layer budgets decreasing linearly with depth (beta schedule).

    Fields: `beta` (20, the reference default), `window` (W = 32), `pooling` and `kernel` (max, 7), plus the base
    fields (budget, layout, gqa). The budget B is the mean over layers (up to the floor error, see
    `pyramid_budgets`); layer l keeps `pyramid_budgets(B, W, beta, n_layers, L)[l]` tokens per head.

    Shapes: queries [B, H_q, T, D] and keys [B, H_c, T, D] of one layer; returns kept indices [B, H_c, B_l].
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("beta", self.beta)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, prompt_len: int) -> int:
        return pyramid_budgets(budget, self.window, self.beta, n_layers, prompt_len)[layer_idx]
