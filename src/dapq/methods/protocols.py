"""The capabilities a method can declare, as explicit base classes the engine checks with `isinstance`.

A method is a `Method` (budget, layout, `select`). On top of that it may declare, by inheriting:

- scoring, by inheriting `dapq.methods.base.ScorerMethod` (a base class, not a protocol of this module): per-query-head
  scores of every prompt key; the base pools, reduces over the GQA group and keeps the top-B. SnapKV, H2O, DapQ,
  PyramidKV, Expected Attention, learned queries, SpecKV.
- `PseudoSuffix`: tokens appended after the prompt during prefill (ids and position ids per row); their queries
  are in `LayerInputs` and their KV is dropped after selection. DapQ.
- `Staged`: selection in two stages. At prefill `observe` returns a typed `StageOneObservation` (the full prompt KV
  is kept for now); the engine then decodes `lookahead_tokens` tokens on the stage-1 cache, capturing their queries,
  and calls `stage2_select` on the full prompt keys (with `lookahead_stops_at_eos`, also `lookahead_valid`: which
  lookahead queries come before each row's end of sequence). LAQ, LAQ++.
- `PositionPolicy`: kept keys are moved to contiguous positions 0..k-1 after selection (`renumbers_positions`).
  StreamingLLM with `rerotate=True`.
- `LayerBudgetSchedule`: a per-layer budget (`layer_budget`). PyramidKV.
- `ContextPass`: scores from a second forward over tokens the method writes (`pass_chunks`), run on the full prompt
  cache after prefill; every layer is then selected at once (`select_layers`, budgets may differ per layer and head
  as long as the row's total holds). KVzip's context reconstruction.
- `DraftedSuffix` (a `PseudoSuffix`): the suffix tokens are written by a draft model from the prompt; the engine runs
  the draft (`dapq.engine.draft`) and the method only says which draft and how many tokens. SpecKV.
- `EmbeddedSuffix` (a `PseudoSuffix`): the suffix is given as input embeddings, not token ids; the engine embeds
  the prompt with the model's own input embeddings and puts the method's vectors at the suffix; optionally with
  low-rank adapters active at the suffix positions only (`suffix_adapters`). Learned queries.

Module-level helpers (`pseudo_length`, `layer_budget`, `renumbers`) answer for any method, declared or not.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from ..lazy import torch
from .inputs import LayerInputs


class PseudoSuffix(abc.ABC):
    """A method that appends pseudo tokens after the prompt during prefill."""

    @property
    @abc.abstractmethod
    def n_pseudo(self) -> int:
        """Tokens appended after each row's prompt."""

    @abc.abstractmethod
    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        """Token ids of the suffix for one row (`prompt_ids` are its real prompt tokens); `n_pseudo` of them."""

    @abc.abstractmethod
    def pseudo_positions(self, prompt_len: int) -> list[int]:
        """Position ids of the suffix for a row of `prompt_len` real tokens; `n_pseudo` of them."""


@dataclass
class StageOneObservation:
    """What a staged method keeps from one layer's prefill step for its second stage."""

    indices: torch.Tensor  # [B, H_c, k] the stage-1 kept prompt tokens (the temporary cache)
    kept_valid: torch.Tensor  # [B, H_c, k] bool
    budgets: torch.Tensor  # [B] long, the final tokens per head of this layer
    scaling: float
    extra: dict[str, Any]  # method-specific tensors (e.g. LAQ++'s last prompt queries)


class Staged(abc.ABC):
    """A method that selects after decoding a few lookahead tokens on a temporary stage-1 cache (LAQ)."""

    @property
    @abc.abstractmethod
    def lookahead_tokens(self) -> int:
        """Tokens decoded on the stage-1 cache (at positions L, L+1, ...) before the final selection."""

    @property
    def lookahead_stops_at_eos(self) -> bool:
        """True: a row's lookahead stops at an end-of-sequence token (the tokenizer's stop ids). The engine still
        decodes `lookahead_tokens` steps for the batch, and passes `stage2_select` a `lookahead_valid` [B, n] that
        marks the queries of the tokens fed before the row's first stop token (the first token is always fed; a
        predicted stop token is not). False (default): every lookahead query counts and `lookahead_valid` is None."""
        return False

    @abc.abstractmethod
    def observe(self, inp: LayerInputs) -> StageOneObservation:
        """At prefill: the stage-1 selection of this layer and whatever stage 2 needs."""

    @abc.abstractmethod
    def stage2_select(
        self,
        lookahead_queries: torch.Tensor,  # [B, H_q, n, D] rotated queries of the lookahead tokens
        keys: torch.Tensor,  # [B, H_c, T, D] the full prompt keys
        positions: torch.Tensor,  # [B, T]
        valid: torch.Tensor,  # [B, T]
        observed: StageOneObservation,
        lookahead_valid: torch.Tensor | None = None,  # [B, n] bool, a prefix per row; None: all n queries count
    ) -> tuple[torch.Tensor, torch.Tensor]:  # kept indices [B, H_c, k] into [0, T), their validity [B, H_c, k]
        """The final selection from the full prompt keys."""


class PositionPolicy(abc.ABC):
    """A method that decides where kept keys sit after selection."""

    @property
    @abc.abstractmethod
    def renumbers_positions(self) -> bool:
        """True: kept keys are re-rotated to positions 0..k-1 and decoding continues at k."""


class LayerBudgetSchedule(abc.ABC):
    """A method whose budget differs per layer."""

    @abc.abstractmethod
    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, prompt_len: int) -> int:
        """Tokens kept per head by layer `layer_idx` when the method's budget for the row is `budget`."""


@dataclass
class PassChunk:
    """One forward of a `ContextPass` for one row: the tokens fed after the row's prompt (at positions L, L+1, ...)
    and the prompt tokens [start, end) (indices into the row's real prompt tokens) that this chunk scores."""

    ids: list[int]
    start: int
    end: int


class ContextPass(abc.ABC):
    """A method that scores the prompt keys by feeding extra tokens on top of the full prompt cache (KVzip).

    The prefill keeps the full prompt KV. Then, for chunk j = 0, 1, ... of every row (`pass_chunks`), the engine
    appends the chunk's tokens at positions L.., captures each layer's rotated queries and the chunk's own keys,
    asks `pass_scores` for the scores of the prompt keys, and cuts the chunk off again; a key's score is the maximum
    over chunks. `select_layers` then chooses every evicted layer's kept tokens at once. The chunks' KV never stays.
    """

    @property
    def pooled_budget(self) -> bool:
        """True when `select_layers` spreads a row's budget unevenly over layers and heads (only the total holds)."""
        return False

    @abc.abstractmethod
    def pass_chunks(self, prompt_ids: list[int], tokenizer: Any) -> list[PassChunk]:
        """The chunks fed for one row whose real prompt tokens are `prompt_ids`."""

    @abc.abstractmethod
    def pass_key(self) -> tuple:
        """Identifies the pass scores (every field that changes them): recordings reuse scores of an equal key."""

    @abc.abstractmethod
    def pass_scores(
        self,
        queries: torch.Tensor,  # [B, H_q, q, D] rotated queries of the chunk tokens
        pass_keys: torch.Tensor,  # [B, H_c, q, D] the chunk tokens' own keys
        pass_valid: torch.Tensor,  # [B, q] bool, False for left padding (and rows without this chunk)
        keys: torch.Tensor,  # [B, H_c, T, D] the full prompt keys
        valid: torch.Tensor,  # [B, T] bool
        span: torch.Tensor,  # [B, T] bool, the prompt keys this chunk scores
        scaling: float,
    ) -> torch.Tensor:  # [B, H_c, T] scores of the span's keys, 0 elsewhere
        """One chunk's scores of the prompt keys at one layer."""

    @abc.abstractmethod
    def select_layers(
        self,
        scores: list[torch.Tensor | None],  # per layer [B, H_c, T] (max over chunks); None: layer not evicted
        valid: torch.Tensor,  # [B, T] bool
        budgets: list[torch.Tensor],  # per layer [B] long, the layer's tokens per head for each row
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:  # per layer kept indices [B, H_c, k] and validity
        """Every evicted layer's kept tokens (a row's total over layers and heads is sum_l budgets[l][b] * H_c)."""


class DraftedSuffix(PseudoSuffix):
    """A pseudo suffix written by a draft model that reads the prompt and greedily writes `n_pseudo` tokens (SpecKV).

    The engine runs the draft (`dapq.engine.draft.draft_suffix`) and appends its tokens at `pseudo_positions`."""

    @property
    @abc.abstractmethod
    def draft_model(self) -> Any:
        """ "self" (the target with its full cache), a loaded model, a local folder or a hub id."""

    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        raise NotImplementedError("the engine writes a drafted suffix with its draft model (dapq.engine.draft)")


class EmbeddedSuffix(PseudoSuffix):
    """A pseudo suffix of input embeddings (learned queries): the engine feeds the prompt's own token embeddings
    followed by `suffix_embeddings` at `pseudo_positions`, so the suffix needs no token of the vocabulary."""

    @abc.abstractmethod
    def suffix_embeddings(self, model_config: Any) -> torch.Tensor:  # [n_pseudo, hidden_size]
        """The suffix's input embeddings for the model whose (transformers) config is `model_config` (the engine
        moves them to its device and dtype); a clear error when they were made for another model."""

    @abc.abstractmethod
    def embedding_key(self) -> str:
        """Identifies the embeddings' content (e.g. a hash): recordings share a prefill only for equal keys."""

    def suffix_adapters(self) -> dict[str, Any] | None:
        """Low-rank adapters that act only at the suffix positions (plain values: `rank`, `scale`, `modules`, and
        per linear layer `a` [r, in] and `b` [out, r]; the engine applies them with `dapq.hf.adapters`), or None.
        The prompt's own hidden states, keys, values and logits stay the model's: the suffix comes last."""
        return None

    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        return [0] * self.n_pseudo  # placeholders: the engine replaces their embeddings


def pseudo_length(method: Any) -> int:
    """Pseudo tokens `method` appends (0 unless it declares `PseudoSuffix`)."""
    return method.n_pseudo if isinstance(method, PseudoSuffix) else 0


def layer_budget(method: Any, budget: int, layer_idx: int, n_layers: int, prompt_len: int) -> int:
    """The layer's budget: the schedule's when `method` declares `LayerBudgetSchedule`, else `budget`."""
    if isinstance(method, LayerBudgetSchedule):
        return method.layer_budget(budget, layer_idx, n_layers, prompt_len)
    return budget


def renumbers(method: Any) -> bool:
    """True when `method` declares `PositionPolicy` and asks for renumbered positions."""
    return isinstance(method, PositionPolicy) and method.renumbers_positions


def pooled_budget(method: Any) -> bool:
    """True when the method's per-layer, per-head kept counts vary and only a row's total over the evicted layers
    and heads equals sum_l B_l * H_c (KVzip's global and per-layer allocations); False: every head keeps B_l."""
    return isinstance(method, ContextPass) and method.pooled_budget


def extra_positions(method: Any) -> int:
    """Positions a method uses beyond the prompt before decoding: pseudo tokens plus lookahead tokens."""
    return pseudo_length(method) + (method.lookahead_tokens if isinstance(method, Staged) else 0)
