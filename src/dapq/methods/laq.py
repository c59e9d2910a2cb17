"""LAQ and LAQ++: Lookahead Q-Cache (arXiv 2505.20334, "Lookahead Q-Cache: Achieving More Consistent KV Eviction
via Pseudo Query").

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

Where the reference code (noforit/Lookahead_Q-Cache, on KVCache-Factory, transformers 4.44) differs from the paper's
description, and the switch that reproduces it (all off by default; the `laq_reference` / `laq++_reference` presets
turn them on):

- The lookahead loop starts from the full-cache prefill's argmax and stops at end-of-sequence (`stop_at_eos`): the
  first token is always fed; a token predicted as EOS is not fed, so the queries used are those of the tokens fed
  before it (the query of the step that predicted EOS counts, later ones do not).
- Selection per query head: KV is repeated per query head before caching (`layout="query_head"`).
- Softmax in fp32, cast to fp16 before the sum over the window queries (`accumulate="fp16"`, stage 2; the stage-1
  SnapKV scores stay fp32 sums).
- The stage-2 causal mask is added onto the last w prompt keys, not onto the query-to-query block
  (`stage2_mask="reference"`): with w = prompt_queries + (lookahead queries used), window query j (prompt queries
  first, then lookahead queries) sees prompt positions up to L - w + j only.
- Batch size 1 only, and no compression when L < B (the engine batches rows and compresses whenever L > B; at
  L == B both keep everything).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy import torch
from .base import POOLINGS, LayerInputs, Method, check_choice, check_kernel, positive_int, register
from .protocols import Staged, StageOneObservation
from .scoring import aggregate_groups, pool_scores, select_topk, window_attention
from .snapkv import window_scores

STAGE2_MASKS = ("none", "reference")
ACCUMULATIONS = ("fp32", "fp16")


@register("laq")
@dataclass
class LAQ(Method, Staged):
    """Lookahead Q-Cache: queries of n tokens decoded on a SnapKV stage-1 cache choose the kept tokens.

    Fields: `n_lookahead` (8), `stage1_window` (SnapKV window of the temporary cache, 32),
    `prompt_queries` (0 for LAQ, 8 for LAQ++), `pooling`/`kernel` (max, 7), plus budget, layout, gqa.
    Reference-code switches (module docstring): `stop_at_eos` (False), `stage2_mask` ("none" | "reference"),
    `accumulate` ("fp32" | "fp16").

    Shapes: lookahead queries [B, H_q, n, D], prompt queries [B, H_q, p, D], full prompt keys [B, H_c, T, D];
    returns kept indices [B, H_c, B_tokens] into [0, T).
    """

    n_lookahead: int = 8
    stage1_window: int = 32
    prompt_queries: int = 0
    pooling: str = "max"
    kernel: int = 7
    stop_at_eos: bool = False
    stage2_mask: str = "none"
    accumulate: str = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_lookahead", self.n_lookahead)
        check_choice("stage2_mask", self.stage2_mask, STAGE2_MASKS)
        check_choice("accumulate", self.accumulate, ACCUMULATIONS)
        positive_int("stage1_window", self.stage1_window)
        positive_int("prompt_queries", self.prompt_queries, minimum=0)
        check_choice("pooling", self.pooling, POOLINGS)
        check_kernel(self.kernel)

    @property
    def min_budget(self) -> int:
        return max(self.stage1_window, self.prompt_queries) + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (
            f"its stage-1 SnapKV cache's {self.stage1_window}-token window",
            "stage1_window (and prompt_queries)",
            "Lower stage1_window or raise the budget.",
        )

    @property
    def lookahead_tokens(self) -> int:
        return self.n_lookahead

    @property
    def lookahead_stops_at_eos(self) -> bool:
        return self.stop_at_eos

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
        lookahead_valid: torch.Tensor | None = None,  # [B, n] bool
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, H_c, k] indices, [B, H_c, k] valid
        scores = self.stage2_scores(lookahead_queries, keys, positions, valid, observed, lookahead_valid)
        return select_topk(scores, observed.budgets)

    def stage2_scores(
        self,
        lookahead_queries: torch.Tensor,  # [B, H_q, n, D]
        keys: torch.Tensor,  # [B, H_c, T, D]
        positions: torch.Tensor,  # [B, T]
        valid: torch.Tensor,  # [B, T]
        observed: StageOneObservation,
        lookahead_valid: torch.Tensor | None = None,  # [B, n] bool, a prefix per row (None: all n)
    ) -> torch.Tensor:  # [B, H_c, T]
        """Stage-2 scores of the prompt keys: the window is the last `prompt_queries` prompt queries (LAQ++) and the
        lookahead queries that `lookahead_valid` marks (the reference mask counts only those in w)."""
        t = keys.shape[2]
        n = lookahead_queries.shape[2]
        scaling = observed.scaling
        prompt_q = observed.extra["prompt_queries"]
        p = 0 if prompt_q is None else prompt_q.shape[2]
        vis = valid[:, None, :].expand(-1, n, -1)  # [B, n, T] lookahead queries come after every prompt key
        pvis = None
        if p:
            q_pos = observed.extra["prompt_query_pos"]  # [B, p]
            pvis = valid[:, None, :] & (positions[:, None, :] <= q_pos[:, :, None])  # [B, p, T]
        if self.stage2_mask == "reference":
            vis, pvis = self.reference_visibility(positions, valid, p, n, lookahead_valid, vis, pvis)
        look = window_attention(lookahead_queries, keys, vis, scaling)  # [B, H_q, n, T]
        if lookahead_valid is not None:
            look = look * lookahead_valid[:, None, :, None]  # queries after a row's end of sequence count 0
        prompt = window_attention(prompt_q, keys, pvis, scaling) if p else None  # [B, H_q, p, T]
        if self.accumulate == "fp16":  # the reference: fp32 softmax cast to fp16, one fp16 sum over the window
            window = look if prompt is None else torch.cat([prompt, look], dim=2)  # [B, H_q, p + n, T]
            s = window.half().sum(dim=2).float()  # [B, H_q, T]
        else:
            s = look.sum(dim=2)
            if prompt is not None:
                s = s + prompt.sum(dim=2)
        forced = torch.zeros_like(valid)
        if p:
            s[..., t - p :] = 0.0  # the prompt-query tokens are kept anyway (ranked among the others, as SnapKV)
            forced[:, t - p :] = True
        s = aggregate_groups(pool_scores(s, self.pooling, self.kernel), keys.shape[1], self.gqa)  # [B, H_c, T]
        s = s.masked_fill(forced[:, None, :] & valid[:, None, :], float("inf"))
        return s.masked_fill(~valid[:, None, :], float("-inf"))

    @staticmethod
    def reference_visibility(
        positions: torch.Tensor,  # [B, T]
        valid: torch.Tensor,  # [B, T]
        p: int,
        n: int,
        lookahead_valid: torch.Tensor | None,  # [B, n] bool
        vis: torch.Tensor,  # [B, n, T]
        pvis: torch.Tensor | None,  # [B, p, T]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference code's stage-2 mask: its causal mask is added onto the last w prompt keys, so window query
        j (p prompt queries, then the m used lookahead queries; w = p + m) sees prompt positions <= L - w + j."""
        length = valid.sum(dim=-1)  # [B] real prompt tokens, at positions 0..L-1
        used = lookahead_valid.sum(dim=-1) if lookahead_valid is not None else torch.full_like(length, n)  # [B]
        limit = length - p - used  # [B]: L - w
        steps = torch.arange(p + n, device=positions.device)  # [p + n] the window index j
        last = limit[:, None] + steps[None, :]  # [B, p + n] the last position window query j sees
        seen = positions[:, None, :] <= last[:, :, None]  # [B, p + n, T]
        vis = vis & seen[:, p:]
        if pvis is not None:
            pvis = pvis & seen[:, :p]
        return vis, pvis


@register("laq++")
@dataclass
class LAQPlusPlus(LAQ):
    """LAQ++: the last 8 prompt queries join the lookahead queries for stage 2, and those 8 tokens are kept."""

    prompt_queries: int = 8


@register("laq_reference")
@dataclass
class LAQReference(LAQ):
    """LAQ as the reference code runs it: stop at EOS, the reference stage-2 mask, fp16 sums, per-query-head cache.

    The four switches of the module docstring set (stop_at_eos, stage2_mask="reference", accumulate="fp16",
    layout="query_head"); every field can still be overridden. Shapes as `LAQ`."""

    layout: str = "query_head"
    stop_at_eos: bool = True
    stage2_mask: str = "reference"
    accumulate: str = "fp16"


@register("laq++_reference")
@dataclass
class LAQPlusPlusReference(LAQReference):
    """LAQ++ as the reference code runs it (its needle script's default: 8 prompt queries + 8 lookahead queries)."""

    prompt_queries: int = 8
