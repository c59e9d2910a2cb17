"""LaCache (Shi et al., 2025, "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large Language
Models", arXiv 2507.14204), applied once at the end of prefill with an exact per-layer token budget.

No scoring: which tokens a layer keeps depends only on token order and the layer index. Ladder geometry, as in the
reference code (GATECH-EIC/LaCache), for n layers, span s and overlap o:

    b = max(1, 1 + ceil((n - s) / (s - o)))      tokens per ladder block
    a = min(ceil(s / (s - o)), b)                tokens of a block each layer keeps (a consecutive slice)
    c = b - a                                    tokens of a block each layer drops

Layer l keeps the slice [off, off + a) of every block with off = l mod (c + 1): consecutive layers keep shifted
slices, and since c <= n - 1 every token of a block is kept by at least one layer.

Mapping onto a budget B for a row of N real tokens (B < N; D = N - B tokens are dropped by every layer):

1. The first S' = min(sinks, B) tokens are kept by every layer; M = B - S' slots remain, of which at most
   M - n go to the ladder (the reference keeps `layer_number` slots free of the ladder for the recent tail).
2. The ladder starts right after the sinks (where the reference's ladder cursor starts): floor(D / c') full blocks
   of b' tokens, then, if r = D mod c' > 0, one partial block of a + r tokens in which layer l keeps the slice
   [off, off + a) with off = l mod (r + 1). Each full block drops c', the partial block r: exactly D in all.
   Normally b' = b and c' = c. When the ladder slots do not fit (ceil(D / c) a > M - n, i.e. a prompt longer
   than about B + (M - n) c / a), blocks are stretched as in the reference's start-over: b' = b + (t - 1)(b - 1),
   c' = b' - a, with the smallest t >= 2 that fits; the slice stays consecutive (the reference strides it by t
   when a > 1), and tokens at block offsets beyond what the n layers' offsets reach are then kept by no layer.
3. The rest of the row after the ladder is the recent tail (at least n tokens), kept by every layer.

So every layer keeps exactly S' + ceil(D / c') a + tail = B tokens. Without a ladder (c = 0, e.g. n <= s, or
M - n < a) the method keeps the S' sinks and the last B - S' tokens (the StreamingLLM pattern). The reference's
`compensation` (cache size raised by floor(c / 2) so that its average matches) is not applied: the budget is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DapqError
from ..lazy import torch
from .base import LayerInputs, Method, positive_int, register
from .scoring import select_topk
from .streaming_llm import real_token_index


def ladder_geometry(n_layers: int, span: int, overlap: int) -> tuple[int, int]:
    """(b, a): block size and tokens of a block kept per layer, from the reference's formulas."""
    step = span - overlap
    block = max(1, 1 + math.ceil((n_layers - span) / step))
    return block, min(math.ceil(span / step), block)


@dataclass(frozen=True)
class LadderPlan:
    """Layout of one row's kept tokens (indices among the row's real tokens, layer-independent parts)."""

    sinks: int  # S': tokens [0, S') kept by every layer
    block: int  # b': size of a full ladder block
    keep: int  # a: slice of a block kept per layer
    blocks: int  # full blocks, starting at S'
    partial: int  # r: tokens dropped by the partial block after the full blocks (0: no partial block)
    tail_start: int  # tokens [tail_start, N) kept by every layer; [ladder end, tail_start) dropped by all

    @property
    def ladder_end(self) -> int:
        return self.sinks + self.blocks * self.block + (self.keep + self.partial if self.partial else 0)

    def kept(self, layer_idx: int, n_tokens: int) -> list[int]:
        """Indices kept by layer `layer_idx` for a row of `n_tokens` real tokens (for inspection and tests)."""
        out = list(range(self.sinks))
        off = layer_idx % (self.block - self.keep + 1)
        for j in range(self.blocks):
            start = self.sinks + j * self.block + off
            out += list(range(start, start + self.keep))
        if self.partial:
            start = self.sinks + self.blocks * self.block + layer_idx % (self.partial + 1)
            out += list(range(start, start + self.keep))
        return out + list(range(self.tail_start, n_tokens))


def ladder_plan(n_tokens: int, budget: int, n_layers: int, span: int, overlap: int, sinks: int) -> LadderPlan:
    """The mapping of the module docstring for a row of `n_tokens` real tokens and a budget of `budget` tokens."""
    budget = min(budget, n_tokens)
    s = min(sinks, budget)
    b, a = ladder_geometry(n_layers, span, overlap)
    c, room, drop = b - a, budget - s, n_tokens - budget
    if drop == 0 or c == 0 or room - n_layers < a:  # nothing to drop, or no room for a ladder: sinks + recent
        return LadderPlan(s, b, a, 0, 0, n_tokens - room)
    max_blocks = (room - n_layers) // a  # the reference keeps n_layers slots free of the ladder
    need = -(-drop // max_blocks)  # smallest drop per block that fits: ceil(D / max_blocks)
    t = 1 if need <= c else 1 + -(-(need - c) // (b - 1))
    b_t = b + (t - 1) * (b - 1)
    c_t = b_t - a
    blocks, partial = divmod(drop, c_t)
    used = (blocks + (1 if partial else 0)) * a
    plan = LadderPlan(s, b_t, a, blocks, partial, n_tokens - (room - used))
    assert plan.ladder_end == plan.tail_start, "ladder and tail must meet"
    return plan


@register("lacache")
@dataclass
class LaCache(Method):
    """LaCache: a ladder of shifted token slices across layers, sinks and the recent tail, exactly B per layer.

    Fields: `span` (16) and `overlap` (0), the reference's ladder hyperparameters; `sinks` (first tokens every layer
    keeps, the reference's start size: 4 in its perplexity code, 128 in its needle code; default 4 for small
    budgets), plus the base fields (budget, layout; `gqa` is unused: every head keeps the same tokens). The mapping
    onto the budget is in the module docstring and in `ladder_plan`.

    Shapes: keys [B, H_c, T, D] of one layer (only their head count is used); returns kept indices [B, H_c, B_tokens].
    """

    span: int = 16
    overlap: int = 0
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("span", self.span)
        positive_int("overlap", self.overlap, minimum=0)
        positive_int("sinks", self.sinks, minimum=0)
        if self.overlap >= self.span:
            raise DapqError(f"overlap ({self.overlap}) must be smaller than span ({self.span}).")

    @property
    def min_budget(self) -> int:
        return self.sinks + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (f"its {self.sinks} sink tokens", "sinks", "Lower sinks or raise the budget.")

    def keep_mask(self, inp: LayerInputs, budgets: torch.Tensor) -> torch.Tensor:  # [B, T] bool
        """Tokens this layer keeps: exactly budgets[b] real tokens of each row."""
        t = inp.prompt_len
        valid = inp.valid[:, :t]  # [B, T]
        u = real_token_index(valid)  # [B, T]
        lengths = valid.sum(-1).tolist()
        plans = [
            ladder_plan(int(n), int(k), inp.n_layers, self.span, self.overlap, self.sinks)
            for n, k in zip(lengths, budgets.tolist())
        ]

        def col(values: list[int]) -> torch.Tensor:  # [B, 1]
            return torch.tensor(values, dtype=torch.long, device=u.device)[:, None]

        sinks = col([p.sinks for p in plans])
        block = col([p.block for p in plans])
        full_end = sinks + col([p.blocks for p in plans]) * block
        partial = col([p.partial for p in plans])
        a = col([p.keep for p in plans])
        off_full = inp.layer_idx % (block - a + 1)  # [B, 1]
        off_part = inp.layer_idx % (partial + 1)  # [B, 1]
        w_full = (u - sinks).remainder(block)  # [B, T] offset inside a full block
        w_part = u - full_end  # [B, T] offset inside the partial block
        in_full = (u >= sinks) & (u < full_end)
        in_part = (partial > 0) & (w_part >= 0) & (w_part < a + partial)
        keep = (u < sinks) | (u >= col([p.tail_start for p in plans]))
        keep |= in_full & (w_full >= off_full) & (w_full < off_full + a)
        keep |= in_part & (w_part >= off_part) & (w_part < off_part + a)
        return keep & valid

    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.keep_mask(inp, budgets)  # [B, T]
        s = keep.float().masked_fill(~inp.valid[:, : inp.prompt_len], float("-inf"))  # [B, T]
        return select_topk(s[:, None, :].expand(-1, inp.keys.shape[1], -1), budgets)
