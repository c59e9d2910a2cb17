"""Decoding from a compressed cache: appending token chunks at each row's next positions, then greedy decoding or
sampling (transformers' semantics), optionally streamed.

Positions are always explicit (the next token of row b goes to `next_pos[b]`, not to the cache length), and every
forward goes through the hook, which builds the mask from the tracked positions and validity of the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DapqError
from ..hf.attention import Step, activate
from ..hf.cache import kv_bytes, reserve
from .decode_time import DecodeCompression, DecodeEvictor
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


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy decoding, with transformers' semantics and order: the logits are divided by
    `temperature`, cut to the `top_k` largest (0: no cut), then to the smallest set of probability mass `top_p`
    (1.0: no cut), and one token is drawn from the softmax. `seed` seeds a private generator (None: torch's global
    one, as transformers' `generate`, so `torch.manual_seed(s)` before either gives the same draws)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise DapqError(f"temperature must be a finite number > 0; got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise DapqError(f"top_k must be an integer >= 0 (0: no cut); got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise DapqError(f"top_p must be in (0, 1] (1: no cut); got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise DapqError(f"seed must be an integer >= 0; got {self.seed!r}")

    def picker(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """logits [B, V] -> one drawn token per row [B], with transformers' own logits warpers."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        gen = torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None

        def pick(logits: torch.Tensor) -> torch.Tensor:
            scores = warpers(None, logits.float())
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=gen).squeeze(1)

        return pick


def greedy_decode(
    cc: CompressedCache,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: set[int],
    *,
    compact: bool = False,
    sampling: Sampling | None = None,
    streamer: Any = None,
    decode_compression: DecodeCompression | None = None,
    report: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Greedy decoding (or, with `sampling`, sampling) from `logits` [B, V]; token i of row b goes to position
    next_pos[b] + i.

    `compact=True` drops finished rows from the batch (and from `cc`, which is then not reusable) once a quarter
    of the active rows has finished, so that long answers of a few rows do not keep the whole batch computing (not
    while sampling: every step draws for all rows, as transformers does, so a seed gives its draws).
    `streamer`: an object with `put(token_ids)` and `end()` (transformers' `TextStreamer(tok)` works for one row):
    each step's new tokens [B] of the rows still running are put as they come (stop tokens are not), then `end()`.
    `decode_compression`: evict back to the method's budget every `interval` tokens (`dapq.engine.decode_time`; no
    compaction then); `report`, if given, receives the KV bytes after every fed token and, with decode_compression,
    its evictions and the most entries a head held.
    """
    n_rows = logits.shape[0]
    device = cc.next_pos.device
    pick = sampling.picker(logits.device) if sampling is not None else (lambda x: x.argmax(-1))
    compact = compact and sampling is None and decode_compression is None
    evictor = DecodeEvictor(cc.state, decode_compression) if decode_compression is not None else None
    steps: list[int] = []  # KV bytes after each fed token (`report`)
    out: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    active = list(range(n_rows))  # the output row of each cache row
    pos = cc.next_pos.clone()  # [A]
    reserve(cc.cache, max_new_tokens)  # room for every step now: no per-step copy of the cache
    for step in range(max_new_tokens):
        tokens = pick(logits)  # [A]
        new = []
        for row, tok in zip(active, tokens.tolist()):
            if not done[row]:
                if tok in stop_ids:
                    done[row] = True
                else:
                    out[row].append(tok)
                    new.append(tok)
        if streamer is not None and new:
            streamer.put(torch.tensor(new))
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
        if report is not None:  # before this step's eviction: the most the cache held
            steps.append(kv_bytes(cc.cache))
        if evictor is not None:
            evictor.step()
    if streamer is not None:
        streamer.end()
    if report is not None:
        report["kv_bytes_steps"] = steps
    if evictor is not None:
        cc.state.stop_capture()
        if report is not None:
            report.update(evictions=evictor.evictions, max_entries_per_head=evictor.max_entries)
    return out
