"""Pure tensor math shared by the eviction methods: window attention, pooling, GQA aggregation, top-k selection.

Nothing here touches transformers; every function takes and returns plain tensors. Shapes use
B = batch, H_q = query heads, H_c = cache heads (H_kv in the `kv_head` layout, H_q in `query_head`),
w = observation-window length, T = key length, k = kept tokens.
"""

from __future__ import annotations

import math
from typing import Any

from ..lazy import torch
from ..lazy import torch_functional as F


def window_attention(
    queries: torch.Tensor,  # [B, H_q, w, D] rotated queries of the observation window
    keys: torch.Tensor,  # [B, H_c, T, D] rotated keys
    visible: torch.Tensor,  # [B, w, T] bool: may query i see key j (causality, padding)
    scaling: float,
) -> torch.Tensor:  # [B, H_q, w, T] fp32 softmax attention
    """Softmax attention of a window of queries over keys, in fp32, GQA-aware (keys shared by head groups)."""
    b, h_q, w, d = queries.shape
    h_c = keys.shape[1]
    if h_q % h_c:
        raise ValueError(f"query heads ({h_q}) must be a multiple of cache heads ({h_c})")
    group = h_q // h_c
    if math.frexp(scaling)[0] == 0.5:  # a power of two (D = 64: 1/8): scaling the queries first is exact and cheaper
        q = (queries.float() * scaling).reshape(b, h_c, group * w, d)  # [B, H_c, G*w, D]
        logits = torch.matmul(q, keys.float().transpose(-1, -2))  # [B, H_c, G*w, T]
    else:
        q = queries.float().reshape(b, h_c, group * w, d)
        logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling)  # a fresh tensor: scaled in place
    logits = logits.view(b, h_q, w, -1)  # [B, H_q, w, T]
    # In-place and only where needed; the values are exactly those of the plain masked_fill / nan_to_num (the
    # prefix of keys that every query sees, e.g. all keys before an observation window, needs no mask).
    hidden = ~visible.all(dim=1).all(dim=0)  # [T] keys that some query does not see
    if bool(hidden.any()):
        first = int(hidden.to(torch.int8).argmax())  # the first such key
        logits[..., first:].masked_fill_(~visible[:, None, :, first:], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not bool(visible.any(dim=-1).all()):  # a query that sees nothing (a pad query) gets NaN: contributes nothing
        probs.nan_to_num_(nan=0.0)
    return probs


def recent_attention(
    queries: torch.Tensor,  # [B, H_q, n, D] rotated queries of the n most recent decoded tokens
    keys: torch.Tensor,  # [B, H_c, T, D] rotated keys of the cache (each head may hold other tokens)
    visible: torch.Tensor,  # [B, H_s, n, T] bool, H_s = 1 or H_c: may query i see cache entry j
    scaling: float,
) -> torch.Tensor:  # [B, H_q, n, T] fp32 softmax attention
    """Softmax attention of recent decode queries over a (possibly per-head evicted) cache, in fp32, GQA-aware."""
    b, h_q, n, d = queries.shape
    h_c = keys.shape[1]
    group = h_q // h_c
    q = queries.float().reshape(b, h_c, group * n, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling).view(b, h_c, group, n, -1)
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))  # [B, H_c, G, n, T]
    probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)
    return probs.reshape(b, h_q, n, -1)


def pool_scores(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """1-D pooling along the key axis (stride 1, same length), as in SnapKV: `scores` is [B, H, T]."""
    if kind == "none" or kernel <= 1:
        return scores
    b, h, t = scores.shape
    flat = scores.reshape(b * h, 1, t)
    pad = kernel // 2
    if kind == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel, stride=1, padding=pad)
    elif kind == "avg":
        pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=pad)
    else:
        raise ValueError(f"unknown pooling {kind!r}")
    return pooled[..., :t].reshape(b, h, t)


def aggregate_groups(scores: torch.Tensor, n_cache_heads: int, how: str) -> torch.Tensor:
    """Reduce per-query-head scores [B, H_q, T] to per-cache-head scores [B, H_c, T] (mean or max over the group)."""
    b, h_q, t = scores.shape
    if h_q == n_cache_heads:
        return scores
    grouped = scores.reshape(b, n_cache_heads, h_q // n_cache_heads, t)  # [B, H_c, G, T]
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"unknown GQA aggregation {how!r}")


def suffix_scores(inp: Any, include_suffix_keys: bool) -> torch.Tensor:  # [B, H_q, T]
    """Attention of a pseudo suffix's queries (the last N of `inp`, a LayerInputs) over the prompt keys, summed over
    the N queries; the softmax includes the suffix's own keys when `include_suffix_keys` (DapQ, SpecKV)."""
    t = inp.prompt_len
    q_slice = slice(t, None)
    k_slice = slice(0, None) if include_suffix_keys else slice(0, t)
    probs = window_attention(
        inp.queries[:, :, q_slice], inp.keys[:, :, k_slice], inp.visible(q_slice, k_slice), inp.scaling
    )  # [B, H_q, N, T(+N)]
    return probs.sum(dim=2)[..., :t]


def select_topk(
    scores: torch.Tensor,  # [B, H_c, T] higher = keep; -inf = never keep
    budgets: torch.Tensor,  # [B] long, tokens to keep per row (already <= the row's real tokens)
) -> tuple[torch.Tensor, torch.Tensor]:  # indices [B, H_c, k] ascending, valid [B, H_c, k]
    """Keep the top `budgets[b]` keys of each row and head; rows with a smaller budget get invalid filler slots.

    k = max(budgets). Returned indices are sorted ascending so the kept cache stays in prompt order.
    """
    k = int(budgets.max().item())
    # A stable sort, not topk: exact ties (max pooling makes plateaus) go to the earliest token, so a row's kept set
    # does not depend on how much left padding the batch gave it.
    top = torch.sort(scores, dim=-1, descending=True, stable=True)
    top_values, top_indices = top.values[..., :k], top.indices[..., :k]  # [B, H_c, k] best first
    rank = torch.arange(k, device=scores.device)  # [k]
    valid = (rank[None, None, :] < budgets[:, None, None]) & (top_values > float("-inf"))  # [B, H_c, k]
    # Sort by index so the kept cache keeps prompt order; invalid slots are pushed to the end.
    big = scores.shape[-1] + 1
    order_key = torch.where(valid, top_indices, top_indices + big)
    order = torch.argsort(order_key, dim=-1)
    return top_indices.gather(-1, order), valid.gather(-1, order)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE convention: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x [B, H, S, D] with cos/sin [B, S, D_rot] (or [B, H, S, D_rot]); dims beyond D_rot pass."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: the rotation by -angle (cos, -sin)."""
    return rotate(x, cos, -sin)
