"""KVzip: query-agnostic KV cache compression with context reconstruction (Kim et al. 2025, arXiv 2505.23416; code
snu-mllab/KVzip; kvpress's `KVzipPress`).

After the prompt is prefilled, the model is asked, on top of the full prompt cache, to repeat the prompt: for each
chunk of `chunk_size` prompt tokens (after the chat template's prefix) it is fed "\\n\\nRepeat the previous context
exactly." (first chunk) or "\\n\\nRepeat the part of the previous context exactly, starting with" + the previous
chunk's last `overlap` tokens (later chunks), the chat template's end of the user turn and start of the assistant's,
then the chunk itself, at positions L, L+1, ... (each chunk's KV is cut off again before the next). A prompt key's
score is the largest attention it receives from those reconstruction queries (max over the queries and over the
query heads of its KV group); the softmax runs over the first `n_sink` prompt keys, the chunk's keys and the
reconstruction tokens' own keys (causal), as in both reference implementations. The sinks are always kept; the
template prefix (beyond the sinks) is in no chunk and scores 0.

Budgets (`allocation`): `global` (kvpress's default `layerwise=False`) ranks the scores of every layer and head of a
row together and keeps sum_l B_l * H_kv of them, so layers and heads keep different counts; `layer`
(`layerwise=True`) ranks the heads of each layer together and keeps B * H_kv per layer; `head` keeps exactly B per
layer and head (uniform, like every other method here). Cost: one more forward over about the prompt's length
(2-3x the prefill's time): `stats["pass_s"]` reports it, `kv_bytes_peak` counts the full cache plus a chunk.

Shapes: reconstruction queries [B, H_q, q, D], their keys [B, H_c, q, D], prompt keys [B, H_c, T, D]; scores
[B, H_c, T]; kept indices [B, H_c, k] into [0, T) (k = the largest count of the layer, the rest marked invalid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import DapqError
from ..lazy import torch
from ..prompts import chat_template_parts
from .base import Method, check_choice, positive_int, register
from .protocols import ContextPass, PassChunk
from .scoring import select_topk

ALLOCATIONS = ("global", "layer", "head")
FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
QUERY_BLOCK = 64  # reconstruction queries scored at a time (2.8x faster than all at once on CPU at chunk 2048)


@register("kvzip")
@dataclass
class KVzip(Method, ContextPass):
    """KVzip with kvpress's defaults.

    Fields: `n_sink` (4), `chunk_size` (2048 prompt tokens per reconstruction forward), `overlap` (8: tokens of the
    previous chunk quoted in the next request), `allocation` (global, layer, head; see module docstring), plus the
    base fields (budget, layout, gqa: KVzip always takes the max over the group, `gqa` is not used).
    """

    n_sink: int = 4
    chunk_size: int = 2048
    overlap: int = 8
    allocation: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_sink", self.n_sink, minimum=0)
        positive_int("chunk_size", self.chunk_size)
        positive_int("overlap", self.overlap, minimum=0)
        check_choice("allocation", self.allocation, ALLOCATIONS)

    @property
    def min_budget(self) -> int:
        return self.n_sink + 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (f"its {self.n_sink} sinks", "n_sink", "Lower n_sink or raise the budget.")

    @property
    def pooled_budget(self) -> bool:
        return self.allocation != "head"

    # ------------------------------------------------------------------------------------------- the pass
    def pass_key(self) -> tuple:
        skip = ("budget", "allocation", "gqa")
        return (
            self.name,
            tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip),
        )

    def pass_chunks(self, prompt_ids: list[int], tokenizer: Any) -> list[PassChunk]:
        if tokenizer is None:
            raise DapqError("kvzip writes its reconstruction request with the tokenizer: call through dapq.generate.")
        prefix, turn_end = chat_template_parts(tokenizer)
        prefix = min(prefix, len(prompt_ids) - 1)
        first = list(tokenizer.encode(FIRST, add_special_tokens=False))
        later = list(tokenizer.encode(LATER, add_special_tokens=False))
        chunks, start = [], prefix
        while start < len(prompt_ids):
            end = min(start + self.chunk_size, len(prompt_ids))
            ask = (
                first
                if not chunks
                else later + (prompt_ids[max(prefix, start - self.overlap) : start] if self.overlap else [])
            )
            chunks.append(PassChunk(ask + list(turn_end) + list(prompt_ids[start:end]), start, end))
            start = end
        return chunks

    def pass_scores(
        self,
        queries: torch.Tensor,  # [B, H_q, q, D]
        pass_keys: torch.Tensor,  # [B, H_c, q, D]
        pass_valid: torch.Tensor,  # [B, q]
        keys: torch.Tensor,  # [B, H_c, T, D]
        valid: torch.Tensor,  # [B, T]
        span: torch.Tensor,  # [B, T]
        scaling: float,
    ) -> torch.Tensor:  # [B, H_c, T]
        b, h_q, q, d = queries.shape
        h_c, t = keys.shape[1], keys.shape[2]
        groups = h_q // h_c
        rank = valid.long().cumsum(-1) - 1  # index among the row's real tokens
        start = torch.where(span, rank, torch.full_like(rank, t)).min(-1).values  # [B] the chunk's first index
        sinks = valid & (rank < torch.minimum(start, torch.full_like(start, self.n_sink))[:, None])
        seen = span | sinks  # [B, T] the prompt keys inside the softmax
        cols = seen.any(0).nonzero().squeeze(-1)  # only those columns (exactly a row's sinks + chunk for B = 1)
        c = len(cols)
        dev = keys.device
        k_ctx = keys[:, :, cols].float().transpose(-1, -2)  # [B, H_c, D, c]
        k_own = pass_keys.float()  # [B, H_c, q, D]
        q_grouped = (queries.float() * scaling).view(b, h_c, groups, q, d)  # query head h -> KV head h // G
        ctx = seen[:, cols]  # [B, c]
        ctx_bias = None  # rows of a batch that reconstruct different spans mask the others' columns
        if not bool(ctx.all()):
            ctx_bias = torch.zeros(ctx.shape, device=dev).masked_fill(~ctx, float("-inf"))[:, None, None, None]
        causal = torch.ones(q, q, dtype=torch.bool, device=dev).tril()  # [q, q]
        own_all = causal[None] & pass_valid[:, None, :]  # [B, q, q] the chunk tokens each query sees
        own_all = own_all | torch.eye(q, dtype=torch.bool, device=dev)  # a padded query sees itself: no empty row
        best = torch.full((b, h_c, c), float("-inf"), device=dev)  # max over queries and group of log softmax
        # blocks of queries (the same numbers as one [G * q, c + q] softmax, within float rounding): the block's
        # logits stay in cache, and a block needs its own keys only up to its last query (causal)
        for s0 in range(0, q, QUERY_BLOCK):
            s1 = min(q, s0 + QUERY_BLOCK)
            n = s1 - s0
            qb = q_grouped[:, :, :, s0:s1].reshape(b, h_c, groups * n, d)
            lc = torch.matmul(qb, k_ctx).view(b, h_c, groups, n, c)  # prompt keys
            if ctx_bias is not None:
                lc = lc + ctx_bias
            lo = torch.matmul(qb, k_own[:, :, :s1].transpose(-1, -2)).view(b, h_c, groups, n, s1)  # own keys
            lo = lo.masked_fill(~own_all[:, None, None, s0:s1, :s1], float("-inf"))
            top = torch.maximum(lc.amax(-1), lo.amax(-1))  # [B, H_c, G, n]
            lse = top + ((lc - top[..., None]).exp().sum(-1) + (lo - top[..., None]).exp().sum(-1)).log()
            lse = lse.masked_fill(~pass_valid[:, None, None, s0:s1], float("inf"))  # padded queries score nothing
            best = torch.maximum(best, (lc - lse[..., None]).amax(dim=(2, 3)))
        out = torch.zeros(b, h_c, t, dtype=best.dtype, device=dev)
        out[:, :, cols] = best.exp()  # max of softmax(logits)[..., :c] = exp(max(logits - lse))
        return out.masked_fill(~span[:, None, :], 0.0)

    # ------------------------------------------------------------------------------------------- selection
    def select_layers(
        self,
        scores: list[torch.Tensor | None],  # per layer [B, H_c, T]
        valid: torch.Tensor,  # [B, T]
        budgets: list[torch.Tensor],  # per layer [B]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        layers = [i for i, s in enumerate(scores) if s is not None]
        if not layers:
            return [None] * len(scores)
        rank = valid.long().cumsum(-1) - 1
        sinks = valid & (rank < self.n_sink)  # [B, T]
        ranked = {}
        for i in layers:
            s = scores[i]
            assert s is not None
            s = s.float().masked_fill(sinks[:, None, :], float("inf"))
            ranked[i] = s.masked_fill(~valid[:, None, :], float("-inf"))  # [B, H_c, T]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(scores)
        if self.allocation == "head":  # exactly the layer's budget per head: the shared top-k
            for i in layers:
                out[i] = select_topk(ranked[i], budgets[i].clamp(max=valid.sum(-1)))
            return out
        stacked = torch.stack([ranked[i] for i in layers], dim=1)  # [B, n_l, H_c, T]
        b, n_l, h_c, t = stacked.shape
        per_layer = torch.stack([budgets[i] for i in layers], dim=1).to(stacked.device)  # [B, n_l]
        lengths = valid.sum(-1)  # [B]
        keep = torch.zeros_like(stacked, dtype=torch.bool)
        for row in range(b):
            n = int(lengths[row])
            if self.allocation == "global":
                groups = [(slice(None), int(per_layer[row].clamp(max=n).sum()) * h_c)]
            else:
                groups = [(j, int(per_layer[row, j].clamp(max=n)) * h_c) for j in range(n_l)]
            for where, k in groups:
                block = stacked[row][where]
                flat = block.reshape(-1)
                # stable: exact ties go to the earliest (layer, head, token), whatever the row's left padding
                top = torch.sort(flat, descending=True, stable=True).indices[:k]
                mask = torch.zeros_like(flat, dtype=torch.bool)
                mask[top] = True
                keep[row][where] = mask.view(block.shape) & (block > float("-inf"))
        for j, i in enumerate(layers):
            out[i] = mask_indices(keep[:, j])
        return out


def mask_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, T] bool -> indices [B, H, k] (k = the largest count): the kept ones first, in ascending order, then
    filler slots; and their validity [B, H, k] (the layout `select_topk` returns)."""
    t = mask.shape[-1]
    k = max(1, int(mask.sum(-1).max()))
    order = torch.arange(t, device=mask.device).expand_as(mask)
    idx = torch.where(mask, order, order + t).topk(k, dim=-1, largest=False, sorted=True).indices
    return idx, mask.gather(-1, idx)
