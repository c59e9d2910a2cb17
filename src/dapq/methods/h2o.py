"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048), in the prefill-only form used by KV-compression papers (DapQ, SnapKV, PyramidKV).

Every prompt query attends over the prompt with the full causal mask (fp32 softmax); a key's score is the column
sum of that attention over all L queries, s_j = sum_i A[i, j]. The top (B - recent) keys by score ("heavy
hitters") are kept together with the last `recent` prompt tokens. No pooling by default.

The L x L attention is never materialised: queries are processed in blocks of `block_size`, so the extra memory is
O(block_size x L) per head, and the result equals the dense computation up to fp32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DapqError
from ..lazy import torch
from .base import LayerInputs, ScorerMethod, positive_int, register
from .scoring import window_attention


def recent_rows_mask(inp: LayerInputs, recent: int) -> torch.Tensor:  # [B, T] bool
    """The last min(`recent`, budget of the row) prompt tokens of every row (left padding: the last indices)."""
    t = inp.prompt_len
    n = inp.budgets.clamp(max=recent)  # [B]
    idx = torch.arange(t, device=inp.valid.device)  # [T]
    return (idx[None, :] >= t - n[:, None].to(idx.device)) & inp.valid[:, :t]


def column_attention_sums(inp: LayerInputs, block_size: int) -> torch.Tensor:  # [B, H_q, T] fp32
    """sum_i softmax(q_i K^T * scaling)[j] over every prompt query i, causal and padding-masked, in query blocks.

    A block of queries [a, e) sees keys [0, e) only (causal by sequence order), so later keys are not computed."""
    t = inp.prompt_len
    b, h_q = inp.queries.shape[:2]
    scores = torch.zeros(b, h_q, t, dtype=torch.float32, device=inp.keys.device)  # [B, H_q, T]
    padded = not bool(inp.valid[:, :t].all())  # without pads the query mask is all ones (skipped: same values)
    for start in range(0, t, block_size):
        end = min(start + block_size, t)
        q_slice, k_slice = slice(start, end), slice(0, end)
        keys = inp.keys[:, :, k_slice]  # [B, H_c, e, D]
        probs = window_attention(inp.queries[:, :, q_slice], keys, inp.visible(q_slice, k_slice), inp.scaling)
        if padded:
            probs.mul_(inp.valid[:, None, q_slice, None])  # [B, 1, w, 1]: pad queries contribute nothing
        scores[..., :end] += probs.sum(dim=2)  # probs [B, H_q, w, e]
    return scores


@register("h2o")
@dataclass
class H2O(ScorerMethod):
    """H2O (prefill-only): heavy hitters by attention column sums over all prompt queries, plus recent tokens.

    Fields: `recent` (tokens always kept at the end of the prompt, inside the budget; default 32 as the window of
    the other methods), `block_size` (queries per block, 256: memory O(block_size x L)), `pooling` (none) and
    `kernel`, plus the base fields (budget, layout, gqa).

    Shapes: queries [B, H_q, T, D] and keys [B, H_c, T, D] of one layer; returns kept indices [B, H_c, B_tokens].
    """

    pooling: str = "none"
    recent: int = 32
    block_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("recent", self.recent, minimum=0)
        positive_int("block_size", self.block_size)
        if isinstance(self.budget, int) and self.budget <= self.recent:
            raise DapqError(
                f"H2O keeps its {self.recent} recent tokens inside the budget: budget ({self.budget}) must be larger "
                f"than recent. Lower recent (e.g. recent={self.budget // 4}) or raise the budget."
            )

    @property
    def min_budget(self) -> int:
        return self.recent + 1

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        return column_attention_sums(inp, self.block_size)

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor | None:  # [B, T] bool
        return recent_rows_mask(inp, self.recent) if self.recent else None
