"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048), in the prefill-only form used by KV-compression papers (DapQ, SnapKV, PyramidKV).

Every prompt query attends over the prompt with the full causal mask (fp32 softmax); a key's score is the column
sum of that attention over all L queries, s_j = sum_i A[i, j]. The top (B - recent) keys by score ("heavy
hitters") are kept together with the last `recent` prompt tokens. No pooling by default.

The L x L attention is never materialised: queries are processed in blocks of `block_size`, so the extra memory is
O(block_size x L) per head, and the result equals the dense computation up to fp32 summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..lazy import torch
from .base import LayerInputs, ScorerMethod, positive_int, register


def recent_rows_mask(inp: LayerInputs, recent: int) -> torch.Tensor:  # [B, T] bool
    """The last min(`recent`, budget of the row) prompt tokens of every row (left padding: the last indices)."""
    t = inp.prompt_len
    n = inp.budgets.clamp(max=recent)  # [B]
    idx = torch.arange(t, device=inp.valid.device)  # [T]
    return (idx[None, :] >= t - n[:, None].to(idx.device)) & inp.valid[:, :t]


def column_attention_sums(inp: LayerInputs, block_size: int) -> torch.Tensor:  # [B, H_q, T] fp32
    """sum_i softmax(q_i K^T * scaling)[j] over every prompt query i, causal and padding-masked, in query blocks.

    A block of queries [a, e) sees keys [0, e) only (causal by sequence order), so later keys are not computed.
    Each block is computed one query head at a time ([w, e] logits stay in the CPU cache): the values are exactly
    those of `window_attention` over all heads of the block (every op is per row / per head)."""
    t = inp.prompt_len
    b, h_q = inp.queries.shape[:2]
    group = h_q // inp.keys.shape[1]
    scores = torch.zeros(b, h_q, t, dtype=torch.float32, device=inp.keys.device)  # [B, H_q, T]
    padded = not bool(inp.valid[:, :t].all())  # without pads the query mask is all ones (skipped: same values)
    pre_scaled = math.frexp(inp.scaling)[0] == 0.5  # a power of two: scaling the queries first is exact
    queries = inp.queries[:, :, :t].float()
    if pre_scaled:
        queries = queries * inp.scaling
    keys = inp.keys.float()
    pos = inp.positions[:, :t]
    # no pads and positions that never decrease: every key before a block is seen by all of its queries, so only
    # the block's own square [a, e) x [a, e) needs a mask (the same mask, built on fewer columns)
    prefix_seen = not padded and bool((pos[:, 1:] >= pos[:, :-1]).all())
    for start in range(0, t, block_size):
        end = min(start + block_size, t)
        k0 = start if prefix_seen else 0
        vis = inp.visible(slice(start, end), slice(k0, end))  # [B, w, e - k0]
        hidden = ~vis.all(dim=1).all(dim=0)  # keys that some query of the block does not see
        first = k0 + int(hidden.to(torch.int8).argmax()) if bool(hidden.any()) else end
        unseen = ~vis[:, :, first - k0 :]  # [B, w, e - first]
        # pad queries see nothing: NaN rows, zeroed (with prefix_seen every query of a later block sees key 0)
        empty_rows = (k0 == 0) and not bool(vis.any(dim=-1).all())
        q_valid = inp.valid[:, start:end, None]  # [B, w, 1]
        for h in range(h_q):
            logits = torch.matmul(queries[:, h, start:end], keys[:, h // group, :end].transpose(-1, -2))  # [B, w, e]
            if not pre_scaled:
                logits.mul_(inp.scaling)
            if first < end:
                logits[..., first:].masked_fill_(unseen, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if empty_rows:
                probs.nan_to_num_(nan=0.0)
            if padded:
                probs.mul_(q_valid)  # pad queries contribute nothing
            scores[:, h, :end] += probs.sum(dim=1)
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

    @property
    def min_budget(self) -> int:
        return self.recent + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (
            f"its {self.recent} recent tokens",
            "recent",
            f"Lower recent (e.g. recent={(self.budget or 4) // 4}) or raise the budget.",
        )

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        return column_attention_sums(inp, self.block_size)

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor | None:  # [B, T] bool
        return recent_rows_mask(inp, self.recent) if self.recent else None
