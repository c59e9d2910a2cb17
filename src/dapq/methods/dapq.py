"""DapQ: decoding-aligned, position-aware pseudo queries (Tian, Su, Li and Zhang, "Where Matters More Than What:
Decoding-aligned KV Cache Compression via Position-aware Pseudo Queries", arXiv 2603.11564, Sections 4.1-4.2).

During prefill, N pseudo tokens are appended after the prompt with the position ids L .. L+N-1 that the first N
generated tokens will occupy. Their queries score every prompt key (Eq. 4, S(j) = sum_i Attention(q_i, k_j)); the
top-B prompt tokens per head are kept (Eq. 5); every pseudo-token KV entry is dropped; decoding starts at position L.

Choices the paper leaves open, and our defaults:
- pooling along the key axis: max pool, kernel 7 (as SnapKV and the KVCache-Factory code DapQ builds on);
- softmax denominator: includes the pseudo keys (`include_pseudo_keys=True`), i.e. the attention exactly as the
  prefill forward computes it; `False` renormalises over prompt keys only;
- force-kept recent tokens: none (`keep_recent=0`); the paper keeps the pure top-B;
- GQA: per-KV-head selection, scores averaged over the query-head group (`gqa="mean"`, `layout="kv_head"`);
- content: `auto` = the first m and last N-m prompt tokens with m = min(4, N // 8) (F4_L28 for N = 32, the paper's
  Llama setting; the paper uses F2_L30 for Qwen).

Ablation knobs (paper Fig. 4): `content` (F{m}_L{n}, RS_C, RC_C, Fix_C, random_vocab), `n_pseudo` (Fig. 4b),
`position_offset` (shift the pseudo positions to [L+offset, L+offset+N), Fig. 4c right) and `insert_part`
(1, 2 or 3: positions inside a random span of that third of the prompt, Fig. 4c left; the pseudo queries then see
only the prompt keys before their positions).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import DapqError
from ..lazy import torch
from .base import KeepsRecent, LayerInputs, ScorerMethod, positive_int, register
from .protocols import PseudoSuffix
from .scoring import suffix_scores

CONTENTS = ("auto", "RS_C", "RC_C", "Fix_C", "random_vocab")
_FL = re.compile(r"^F(\d+)_L(\d+)$")
DEFAULT_FIXED_TEXT = "Sorry, I don't know. "


@register("dapq")
@dataclass
class DapQ(KeepsRecent, ScorerMethod, PseudoSuffix):
    """DapQ with every knob of the paper's method and ablations.

    Fields: `n_pseudo` N (32), `content` (see module docstring), `fixed_text` (Fix_C sentence), `seed` (random
    contents and insertion spans), `position_offset` (0), `insert_part` (None, 1, 2, 3), `include_pseudo_keys`
    (True), `keep_recent` (0), `pooling`/`kernel` (max, 7), plus the base fields (budget, layout, gqa).

    Shapes: the layer's queries [B, H_q, T+N, D] (the pseudo queries are the last N) and keys [B, H_c, T+N, D];
    returns kept indices [B, H_c, B_tokens] into the prompt [0, T).
    """

    n_pseudo_tokens: int = 32
    content: str = "auto"
    fixed_text: str = DEFAULT_FIXED_TEXT
    seed: int = 0
    position_offset: int = 0
    insert_part: int | None = None
    include_pseudo_keys: bool = True
    keep_recent: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_pseudo_tokens (N)", self.n_pseudo_tokens)
        positive_int("position_offset", self.position_offset, minimum=0)
        positive_int("keep_recent", self.keep_recent, minimum=0)
        if self.content not in CONTENTS:
            m = _FL.match(self.content)
            if not m:
                raise DapqError(
                    f"content must be F<m>_L<n> (e.g. F4_L28) or one of {', '.join(CONTENTS)}; got {self.content!r}"
                )
            if int(m.group(1)) + int(m.group(2)) != self.n_pseudo_tokens:
                raise DapqError(
                    f"content {self.content} gives {int(m.group(1)) + int(m.group(2))} tokens but n_pseudo_tokens is "
                    f"{self.n_pseudo_tokens}: make m + n equal N, or use content='auto'."
                )
        if self.insert_part not in (None, 1, 2, 3):
            raise DapqError(f"insert_part must be None, 1, 2 or 3; got {self.insert_part!r}")
        if self.insert_part is not None and self.position_offset:
            raise DapqError("insert_part and position_offset are two different ablations: set only one of them.")

    @property
    def n_pseudo(self) -> int:
        return self.n_pseudo_tokens

    def first_last(self) -> tuple[int, int]:
        """(m, n) of the F{m}_L{n} content."""
        if self.content == "auto":
            m = min(4, self.n_pseudo_tokens // 8)
            return m, self.n_pseudo_tokens - m
        match = _FL.match(self.content)
        assert match is not None
        return int(match.group(1)), int(match.group(2))

    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        n, length = self.n_pseudo_tokens, len(prompt_ids)
        rng = random.Random(self.seed)
        if self.content == "RS_C":  # N random single tokens of the prompt, in prompt order
            idx = sorted(rng.sample(range(length), n)) if length >= n else sorted(rng.choices(range(length), k=n))
            return [prompt_ids[i] for i in idx]
        if self.content == "RC_C":  # a random consecutive span of the prompt
            start = rng.randrange(max(1, length - n + 1))
            return [prompt_ids[(start + i) % length] for i in range(n)]
        if self.content == "Fix_C":  # a fixed nonsense sentence, repeated
            if tokenizer is None:
                raise DapqError("content='Fix_C' needs the tokenizer: call through dapq.generate / dapq.compress.")
            sentence = tokenizer.encode(self.fixed_text, add_special_tokens=False) or [0]
            return [sentence[i % len(sentence)] for i in range(n)]
        if self.content == "random_vocab":
            return [rng.randrange(vocab_size) for _ in range(n)]
        m, last = self.first_last()  # F{m}_L{n}; short prompts wrap around
        head = [prompt_ids[i % length] for i in range(m)]
        tail = [prompt_ids[(length - last + i) % length] for i in range(last)]
        return head + tail

    def pseudo_positions(self, prompt_len: int) -> list[int]:
        n = self.n_pseudo_tokens
        if self.insert_part is None:
            start = prompt_len + self.position_offset
        else:
            lo = (self.insert_part - 1) * prompt_len // 3
            hi = self.insert_part * prompt_len // 3
            if hi - lo < n:
                raise DapqError(
                    f"insert_part={self.insert_part} needs each third of the prompt ({prompt_len // 3} tokens) to hold "
                    f"N={n} pseudo positions: use a longer prompt or a smaller n_pseudo_tokens."
                )
            start = random.Random(self.seed).randrange(lo, hi - n + 1)
        return list(range(start, start + n))

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        return suffix_scores(inp, self.include_pseudo_keys)
