"""What one layer's prefill step hands to a method: `LayerInputs`, built by one factory (`layer_inputs`).

Every field is a plain tensor or number, so methods stay pure tensor math. T = padded prompt length, N = pseudo
tokens appended after it (0 for methods without a pseudo suffix), H_c = cache heads (H_kv, or H_q in the
`query_head` layout), D = head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import DapqError
from ..lazy import torch
from .scoring import unrotate

# positions [B, S] long -> (cos, sin) [B, S, D_rot]: the layer's rotary embedding at those positions
Rotary = Callable[[Any], tuple[Any, Any]]


@dataclass
class LayerInputs:
    """One layer's prefill step. Build it with `layer_inputs(...)`; derive variants with its methods."""

    queries: torch.Tensor  # [B, H_q, T + N, D] rotated queries of the prefill step (prompt + pseudo suffix)
    keys: torch.Tensor  # [B, H_c, T + N, D] rotated keys
    positions: torch.Tensor  # [B, T + N] position ids
    valid: torch.Tensor  # [B, T + N] bool, False for left padding
    budgets: torch.Tensor  # [B] long, tokens this layer keeps per head for each row
    prompt_len: int  # T
    scaling: float
    layer_idx: int
    n_layers: int
    values: torch.Tensor | None = None  # [B, H_c, T + N, D] values (the engine always passes them)
    config: Any = None  # the layer's model config (transformers PretrainedConfig), read-only
    rotary: Rotary | None = None  # the model's rotary embedding as a function of positions (pre-RoPE queries)
    # Scores that do not depend on the budget, shared by the methods derived from one recording (evaluation path):
    # key -> tensor. None (serving path): nothing is memoised.
    memo: dict[Any, torch.Tensor] | None = None

    @property
    def n_pseudo(self) -> int:
        return self.queries.shape[2] - self.prompt_len

    def visible(self, q_slice: slice, k_slice: slice) -> torch.Tensor:  # [B, w, T_k] bool
        """Causal visibility (by sequence order and by position) and padding, for queries and keys in the slices."""
        seq = torch.arange(self.queries.shape[2], device=self.positions.device)
        q_seq, k_seq = seq[q_slice], seq[k_slice]
        q_pos, k_pos = self.positions[:, q_slice], self.positions[:, k_slice]
        vis = (k_seq[None, None, :] <= q_seq[None, :, None]) & (k_pos[:, None, :] <= q_pos[:, :, None])
        return vis & self.valid[:, None, k_slice]

    def pre_rope_queries(self, q_slice: slice = slice(None)) -> torch.Tensor:  # [B, H_q, w, D]
        """The queries in `q_slice` before RoPE (their rotation undone with the layer's rotary embedding)."""
        if self.rotary is None:
            raise DapqError("This method needs pre-RoPE queries, but the engine passed no rotary embedding.")
        cos, sin = self.rotary(self.positions[:, q_slice])  # [B, w, D_rot]
        return unrotate(self.queries[:, :, q_slice], cos, sin)

    def prompt_only(self) -> LayerInputs:
        """The same inputs without the pseudo suffix (for methods that do not use it)."""
        if self.n_pseudo == 0:
            return self
        t = self.prompt_len
        return replace(
            self,
            queries=self.queries[:, :, :t],
            keys=self.keys[:, :, :t],
            values=None if self.values is None else self.values[:, :, :t],
            positions=self.positions[:, :t],
            valid=self.valid[:, :t],
        )


def layer_inputs(
    *,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor | None,
    positions: torch.Tensor,
    valid: torch.Tensor,
    prompt_len: int,
    scaling: float | None,
    layer_idx: int,
    n_layers: int,
    budgets: torch.Tensor | None = None,
    config: Any = None,
    rotary: Rotary | None = None,
    memo: dict[Any, torch.Tensor] | None = None,
) -> LayerInputs:
    """The one constructor of `LayerInputs` (prefill hook, replay, tests): bookkeeping moved to the keys' device,
    the default attention scaling 1/sqrt(D) when the layer passes none."""
    dev = keys.device
    return LayerInputs(
        queries=queries,
        keys=keys,
        values=values,
        positions=positions.to(dev),
        valid=valid.to(dev),
        budgets=torch.empty(0, dtype=torch.long, device=dev) if budgets is None else budgets,
        prompt_len=prompt_len,
        scaling=float(scaling if scaling is not None else queries.shape[-1] ** -0.5),
        layer_idx=layer_idx,
        n_layers=n_layers,
        config=config,
        rotary=rotary,
        memo=memo,
    )
