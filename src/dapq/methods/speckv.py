"""SpecKV: draft-token lookahead (Galim et al., "Draft-based Approximate Inference for LLMs", ICLR 2026,
arXiv 2506.08373; code furiosa-ai/draft-based-approx-llm).

A draft model that shares the target's tokenizer reads the full prompt and greedily writes `n_draft` tokens (32).
The target's prefill appends them after the prompt at positions L .. L+n-1, exactly as DapQ appends its pseudo
tokens (`PseudoSuffix`), so their queries see the whole prompt; the attention of those n queries scores every
prompt key (fp32 softmax, summed over the n queries, pooled along the key axis), the top-B prompt tokens per head
are kept and every draft-token entry is dropped; decoding starts at position L. The target's peak KV is DapQ's; the
draft's own prefill and n decode steps are extra time and memory, reported as `draft_s` / `draft_kv_bytes_peak`.

`draft="self"` lets the target draft for itself with its full cache: one more full prefill plus n decode steps,
the upper bound of the idea (the draft is then exactly the target's greedy answer), measured and labelled as such.
A loaded model, a local folder or a hub id gives a real (smaller) draft; the engine loads and runs it
(`dapq.engine.draft`). The draft writes exactly n tokens (it does not stop at end-of-sequence).

Shapes: the layer's queries [B, H_q, T+n, D] (the draft-token queries are the last n), keys [B, H_c, T+n, D];
scores [B, H_q, T]; kept indices [B, H_c, B_tokens] into the prompt [0, T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DapqError
from ..lazy import torch
from .base import LayerInputs, ScorerMethod, positive_int, register
from .protocols import DraftedSuffix
from .scoring import suffix_scores


@register("speckv")
@dataclass
class SpecKV(ScorerMethod, DraftedSuffix):
    """SpecKV. Fields: `n_draft` (32 draft tokens), `draft` ("self", a loaded model, a folder or a hub id),
    `include_pseudo_keys` (True: the softmax includes the draft tokens' own keys, as real decoding would),
    `pooling`/`kernel` (max, 7), plus budget, layout, gqa.

    A loaded model passed as `draft` is kept aside and the field holds its label ("loaded:<name>"), so the method
    stays a plain, printable configuration (result rows store its fields)."""

    n_draft: int = 32
    draft: Any = "self"
    include_pseudo_keys: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("n_draft", self.n_draft)
        if not isinstance(self.draft, str):
            if not hasattr(self.draft, "config"):
                raise DapqError(f"draft must be 'self', a loaded model, a local folder or a hub id; got {self.draft!r}")
            self._draft = self.draft
            self.draft = f"loaded:{getattr(self.draft.config, '_name_or_path', '') or type(self.draft).__name__}"
        elif self.draft.startswith("loaded:") and not hasattr(self, "_draft"):
            raise DapqError(
                f"draft {self.draft!r} names a model loaded in another process: pass the model itself, a folder or a "
                "hub id."
            )
        elif not self.draft:
            raise DapqError("draft must be 'self', a loaded model, a local folder or a hub id; got ''.")

    @property
    def draft_model(self) -> Any:
        return getattr(self, "_draft", self.draft)

    @property
    def n_pseudo(self) -> int:
        return self.n_draft

    def pseudo_positions(self, prompt_len: int) -> list[int]:
        return list(range(prompt_len, prompt_len + self.n_draft))

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        return suffix_scores(inp, self.include_pseudo_keys)
