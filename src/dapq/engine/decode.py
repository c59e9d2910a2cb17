"""Decoding from a compressed cache: appending token chunks at each row's next positions and greedy decoding.

Positions are always explicit (the next token of row b goes to `next_pos[b]`, not to the cache length), and every
forward goes through the hook, which builds the mask from the tracked positions and validity of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..hf.attention import Step, activate
from ..hf.cache import reserve
from .state import EngineState


@dataclass
class CompressedCache:
    """A compressed prompt cache, ready to decode from: `next_pos` [B] is where each row's next token goes."""

    model: Any
    cache: Any
    state: EngineState
    first_logits: torch.Tensor  # [B, V] logits of the last prompt token (computed with the full KV)
    next_pos: torch.Tensor  # [B] long
    prompt_lengths: list[int]
    stats: dict[str, Any]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed a chunk [B, q] after the cache; returns the last column's logits [B, V]."""
        self.state.set_step(Step(pos=pos, valid=valid))
        with activate(list(self.state.info.configs), self.state), torch.inference_mode():
            out = self.model(
                input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True, logits_to_keep=1
            )
        self.state.set_step(None)
        return out.logits[:, -1].float()

    def select_rows(self, idx: torch.Tensor) -> None:
        """Keep only the batch rows `idx` [A]."""
        self.state.keep_rows(idx)
        self.next_pos = self.next_pos.index_select(0, idx.to(self.next_pos.device))
        self.first_logits = self.first_logits.index_select(0, idx.to(self.first_logits.device))
        self.prompt_lengths = [self.prompt_lengths[j] for j in idx.tolist()] if self.prompt_lengths else []


def append(cc: CompressedCache, rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Append token ids (one list per row, left-padded into one chunk) at each row's next positions.

    Returns the logits of each row's last appended token [B, V]; advances `cc.next_pos`.
    """
    device = cc.next_pos.device
    q = max(len(r) for r in rows)
    if q == 0:
        return cc.first_logits
    ids = torch.full((len(rows), q), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), q), dtype=torch.long)
    valid = torch.zeros((len(rows), q), dtype=torch.bool)
    for b, r in enumerate(rows):
        pad = q - len(r)
        if r:
            ids[b, pad:] = torch.tensor(r)
            pos[b, pad:] = int(cc.next_pos[b]) + torch.arange(len(r))
            valid[b, pad:] = True
        pos[b, :pad] = int(cc.next_pos[b])  # masked anyway
    logits = cc.forward(ids.to(device), pos.to(device), valid.to(device))
    cc.next_pos = cc.next_pos + torch.tensor([len(r) for r in rows], device=device)
    return logits


def greedy_decode(
    cc: CompressedCache, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int], *, compact: bool = False
) -> list[list[int]]:
    """Greedy decoding from `logits` [B, V]; token i of row b goes to position next_pos[b] + i.

    `compact=True` drops finished rows from the batch (and from `cc`, which is then not reusable) once a quarter
    of the active rows has finished, so that long answers of a few rows do not keep the whole batch computing.
    """
    n_rows = logits.shape[0]
    device = cc.next_pos.device
    out: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    active = list(range(n_rows))  # the output row of each cache row
    pos = cc.next_pos.clone()  # [A]
    reserve(cc.cache, max_new_tokens)  # room for every step now: no per-step copy of the cache
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # [A]
        for row, tok in zip(active, tokens.tolist()):
            if not done[row]:
                if tok in stop_ids:
                    done[row] = True
                else:
                    out[row].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        if compact:
            keep = [j for j, row in enumerate(active) if not done[row]]
            if len(keep) <= 3 * len(active) // 4:
                idx = torch.tensor(keep, device=device)
                cc.select_rows(idx)
                reserve(cc.cache, max_new_tokens - step)
                tokens, pos, active = tokens[idx], pos[idx], [active[j] for j in keep]
        ones = torch.ones((len(active), 1), dtype=torch.bool, device=device)
        logits = cc.forward(tokens[:, None], pos[:, None], ones)
        pos = pos + 1
    return out
