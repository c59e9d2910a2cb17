"""LAQ and LAQ++: Lookahead Q-Cache (arXiv 2505.20334, "Lookahead Q-Cache: Achieving More Consistent KV Eviction
via Pseudo Query"; abstract in ../shared/paper/laq-abstract.txt).

1. Full prefill; the full prompt cache is kept for now.
2. Stage 1: a temporary SnapKV cache at budget B (window `stage1_window`, max pool 7).
3. `n_lookahead` tokens (default 8) are greedily decoded on the temporary cache at the true future positions
   L, L+1, ...; each step's rotated query is recorded per layer.
4. Stage 2: the lookahead queries (LAQ) or the last `prompt_queries` prompt queries plus the lookahead queries
   (LAQ++, `prompt_queries=8`, those prompt tokens kept) score the full prompt keys; max pool 7; top B kept.
   The lookahead tokens and the temporary cache are discarded; decoding restarts at position L.

The engine drives steps 2-3 (`dapq.engine.stages`), this file holds the math behind the `Staged` protocol:
`observe` (stage 1, at prefill, a `StageOneObservation`) and `stage2_select`. The peak KV memory (full cache +
stage-1 cache + lookahead entries) is reported in `stats["kv_bytes_peak"]`: the DapQ paper's argument against LAQ
is that peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DapqError
from ..lazy import torch
from .base import POOLINGS, LayerInputs, Method, check_choice, check_kernel, positive_int, register
from .protocols import Staged, StageOneObservation
from .scoring import aggregate_groups, pool_scores, select_topk, window_attention
from .snapkv import window_scores


@register("laq")
@dataclass
class LAQ(Method, Staged):
    """Lookahead Q-Cache: queries of n tokens decoded on a SnapKV stage-1 cache choose the kept tokens.

    Fields: `n_lookahead` (8), `stage1_window` (SnapKV window of the temporary cache, 32),
    `prompt_queries` (0 for LAQ, 8 for LAQ++), `pooling`/`kernel` (max, 7), plus budget, layout, gqa.

    Shapes: lookahead queries [B, H_q, n, D], prompt queries [B, H_q, p, D], full prompt keys [B, H_c, T, D];
    returns kept indices [B, H_c, B_tokens] into [0, T).
    """

    n_lookahead: int = 8
    stage1_window: int = 32
    prompt_queries: int = 0
    pooling: str = "max"
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_lookahead", self.n_lookahead)
        positive_int("stage1_window", self.stage1_window)
        positive_int("prompt_queries", self.prompt_queries, minimum=0)
        check_choice("pooling", self.pooling, POOLINGS)
        check_kernel(self.kernel)
        if isinstance(self.budget, int) and self.budget <= max(self.stage1_window, self.prompt_queries):
            raise DapqError(
                f"LAQ's stage-1 SnapKV cache keeps a {self.stage1_window}-token window inside the budget: budget "
                f"({self.budget}) must be larger than stage1_window (and prompt_queries). Lower stage1_window."
            )

    @property
    def min_budget(self) -> int:
        return max(self.stage1_window, self.prompt_queries) + 1

    @property
    def lookahead_tokens(self) -> int:
        return self.n_lookahead

    def observe(self, inp: LayerInputs) -> StageOneObservation:
        """At prefill: the stage-1 SnapKV selection and the last prompt queries (LAQ++), for the lookahead stage."""
        t = inp.prompt_len
        w = min(self.stage1_window, int(inp.budgets.min().item()))
        s = pool_scores(window_scores(inp, w), self.pooling, self.kernel)  # [B, H_q, T]
        s = aggregate_groups(s, inp.keys.shape[1], self.gqa)  # [B, H_c, T]
        recent = torch.zeros_like(inp.valid[:, :t])
        recent[:, t - w :] = True
        s = s.masked_fill(recent[:, None, :], float("inf")).masked_fill(~inp.valid[:, None, :t], float("-inf"))
        p = min(self.prompt_queries, t)
        idx, kept_valid = select_topk(s, inp.budgets)  # [B, H_c, k], [B, H_c, k]
        extra = {
            "prompt_queries": inp.queries[:, :, t - p : t] if p else None,  # [B, H_q, p, D]
            "prompt_query_pos": inp.positions[:, t - p : t] if p else None,  # [B, p]
        }
        return StageOneObservation(idx, kept_valid, inp.budgets, inp.scaling, extra)

    def stage2_select(
        self,
        lookahead_queries: torch.Tensor,  # [B, H_q, n, D]
        keys: torch.Tensor,  # [B, H_c, T, D] the full prompt keys
        positions: torch.Tensor,  # [B, T]
        valid: torch.Tensor,  # [B, T]
        observed: StageOneObservation,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, H_c, k] indices, [B, H_c, k] valid
        return select_topk(self.stage2_scores(lookahead_queries, keys, positions, valid, observed), observed.budgets)

    def stage2_scores(
        self,
        lookahead_queries: torch.Tensor,  # [B, H_q, n, D]
        keys: torch.Tensor,  # [B, H_c, T, D]
        positions: torch.Tensor,  # [B, T]
        valid: torch.Tensor,  # [B, T]
        observed: StageOneObservation,
    ) -> torch.Tensor:  # [B, H_c, T]
        t = keys.shape[2]
        n = lookahead_queries.shape[2]
        scaling = observed.scaling
        vis = valid[:, None, :].expand(-1, n, -1)  # lookahead queries come after every prompt key
        s = window_attention(lookahead_queries, keys, vis, scaling).sum(dim=2)  # [B, H_q, T]
        prompt_q = observed.extra["prompt_queries"]
        forced = torch.zeros_like(valid)
        if prompt_q is not None:
            p = prompt_q.shape[2]
            q_pos = observed.extra["prompt_query_pos"]  # [B, p]
            pvis = valid[:, None, :] & (positions[:, None, :] <= q_pos[:, :, None])  # [B, p, T]
            s = s + window_attention(prompt_q, keys, pvis, scaling).sum(dim=2)
            s[..., t - p :] = 0.0  # the prompt-query tokens are kept anyway (ranked among the others, as SnapKV)
            forced[:, t - p :] = True
        s = aggregate_groups(pool_scores(s, self.pooling, self.kernel), keys.shape[1], self.gqa)  # [B, H_c, T]
        s = s.masked_fill(forced[:, None, :] & valid[:, None, :], float("inf"))
        return s.masked_fill(~valid[:, None, :], float("-inf"))


@register("laq++")
@dataclass
class LAQPlusPlus(LAQ):
    """LAQ++: the last 8 prompt queries join the lookahead queries for stage 2, and those 8 tokens are kept."""

    prompt_queries: int = 8
