"""The method interface and the registry.

A method is a `@dataclass` whose fields are its hyperparameters. The `hf/` package hands it a `LayerInputs`
(plain tensors of one layer's prefill step) and the method returns which prompt tokens each cache head keeps.
Register a method with `@register("name")`; look it up with `get_method("name", budget=128, ...)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import DapqError
from ..lazy import torch
from .scoring import aggregate_groups, pool_scores, select_topk

_REGISTRY: dict[str, type[Method]] = {}

LAYOUTS = ("kv_head", "query_head")
GQA_AGGREGATIONS = ("mean", "max")
POOLINGS = ("none", "max", "avg")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as `get_method(name)` and in `dapq list`."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> dict[str, type[Method]]:
    """All registered methods, by name."""
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method by name; unknown names and parameters give errors that list valid ones."""
    if name not in _REGISTRY:
        raise DapqError(f"Unknown method {name!r}. Valid methods: {', '.join(sorted(_REGISTRY))}.")
    cls = _REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise DapqError(
            f"Method {name!r} has no parameter(s) {', '.join(unknown)}. Its parameters: {', '.join(sorted(valid))}."
        )
    return cls(**params)


@dataclass
class LayerInputs:
    """What one layer's prefill step hands to a method. T = padded prompt length, N = pseudo tokens."""

    queries: torch.Tensor  # [B, H_q, T + N, D] rotated queries of the prefill step (prompt + pseudo suffix)
    keys: torch.Tensor  # [B, H_c, T + N, D] rotated keys (H_c = H_kv, or H_q in the query_head layout)
    positions: torch.Tensor  # [B, T + N] position ids
    valid: torch.Tensor  # [B, T + N] bool, False for left padding
    budgets: torch.Tensor  # [B] long, tokens this layer keeps per head for each row
    prompt_len: int  # T
    scaling: float
    layer_idx: int
    n_layers: int
    # Scores that do not depend on the budget, shared by the methods derived from one recording (evaluation path):
    # key -> [B, H_q, T]. None (serving path): nothing is memoised.
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


@dataclass
class Method:
    """Base of all methods. `budget`: tokens kept per head per layer (int >= 1) or a prompt ratio (0 < float < 1).

    `layout`: `kv_head` keeps one set per KV head (real memory saving; per-query-head scores are reduced over the
    GQA group with `gqa` = mean or max), `query_head` repeats KV per query head and selects per query head, as the
    KVCache-Factory reference code does (cache G times larger).
    """

    name: ClassVar[str] = "base"
    budget: int | float | None = None
    layout: str = "kv_head"
    gqa: str = "mean"

    def __post_init__(self) -> None:
        b = self.budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise DapqError(f"budget must be a number of tokens (int >= 1) or a ratio in (0, 1); got {b!r}")
            if isinstance(b, float) and b.is_integer() and b >= 1:
                self.budget = b = int(b)
            if isinstance(b, float) and not 0 < b < 1:
                raise DapqError(f"budget as a ratio must be in (0, 1); got {b}. Pass an int for a token count.")
            if isinstance(b, int) and b < 1:
                raise DapqError(f"budget must be >= 1 token per head; got {b}.")
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("gqa", self.gqa, GQA_AGGREGATIONS)

    # --- prefill suffix (DapQ overrides these) -------------------------------------------------------------
    @property
    def n_pseudo(self) -> int:
        """Tokens appended after the prompt during prefill (0 for all methods but DapQ)."""
        return 0

    def pseudo_ids(self, prompt_ids: list[int], vocab_size: int, tokenizer: Any = None) -> list[int]:
        """Token ids of the pseudo suffix for one row (`prompt_ids` are its real prompt tokens)."""
        return []

    def pseudo_positions(self, prompt_len: int) -> list[int]:
        """Position ids of the pseudo suffix for a row of `prompt_len` real tokens."""
        return []

    @property
    def deferred(self) -> bool:
        """True for methods that select after extra decoding steps (LAQ): prefill keeps the full prompt KV and
        calls `observe`; the engine then runs the method's later stage."""
        return False

    def observe(self, inp: LayerInputs) -> Any:
        """Deferred methods: what to remember from this layer's prefill step."""
        raise NotImplementedError

    @property
    def lookahead_tokens(self) -> int:
        """Tokens a deferred method decodes after prefill before its final selection (LAQ); 0 otherwise."""
        return 0

    @property
    def renumbers_positions(self) -> bool:
        """True when kept keys are moved to contiguous positions 0..k-1 after selection (StreamingLLM rerotate)."""
        return bool(getattr(self, "rerotate", False))

    # --- budgets -------------------------------------------------------------------------------------------
    @property
    def compresses(self) -> bool:
        return self.budget is not None

    def token_budget(self, prompt_len: int) -> int:
        """Tokens kept per head for a prompt of `prompt_len` real tokens (never more than the prompt)."""
        if self.budget is None:
            return prompt_len
        b = math.ceil(self.budget * prompt_len) if isinstance(self.budget, float) else self.budget
        return max(1, min(b, prompt_len))

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, prompt_len: int) -> int:
        """Per-layer budget (PyramidKV overrides this); default: the same budget on every layer."""
        return budget

    # --- selection -----------------------------------------------------------------------------------------
    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into [0, T) kept per cache head, and their validity: ([B, H_c, k], [B, H_c, k])."""
        raise NotImplementedError

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


@dataclass
class ScorerMethod(Method):
    """A method that scores every prompt key per query head, pools, reduces over GQA groups and keeps the top-B.

    Subclasses implement `query_head_scores` ([B, H_q, T]) and optionally `forced_keep` ([B, T] bool: tokens
    kept regardless of score; they count towards the budget).
    """

    pooling: str = "max"
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("pooling", self.pooling, POOLINGS)
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise DapqError(f"kernel must be an odd integer >= 1; got {self.kernel!r}")

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        raise NotImplementedError

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor | None:  # [B, T] bool
        return None

    def score_key(self) -> tuple:
        """Identifies `query_head_scores`: every field but the budget (which only the selection and forced_keep use)."""
        return (
            self.name,
            tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "budget"),
        )

    def scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_c, T], -inf for never-keep
        t = inp.prompt_len
        key = self.score_key() if inp.memo is not None else None
        s = inp.memo.get(key) if inp.memo is not None else None
        if s is None:
            s = self.query_head_scores(inp)  # [B, H_q, T]
            if inp.memo is not None:
                inp.memo[key] = s
        s = pool_scores(s, self.pooling, self.kernel)
        s = aggregate_groups(s, inp.keys.shape[1], self.gqa)  # [B, H_c, T]
        forced = self.forced_keep(inp)
        if forced is not None:
            s = s.masked_fill(forced[:, None, :], float("inf"))
        return s.masked_fill(~inp.valid[:, None, :t], float("-inf"))

    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_topk(self.scores(inp), budgets)


def recent_mask(inp: LayerInputs, n: int) -> torch.Tensor:  # [B, T] bool
    """The last `n` prompt tokens of every row (left padding puts them at the same indices for all rows)."""
    t = inp.prompt_len
    mask = torch.zeros(inp.valid.shape[0], t, dtype=torch.bool, device=inp.valid.device)
    if n > 0:
        mask[:, max(0, t - n) :] = True
    return mask & inp.valid[:, :t]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DapqError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """Validate an integer hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DapqError(f"{name} must be an integer >= {minimum}; got {value!r}")


__all__ = [
    "LayerInputs",
    "Method",
    "ScorerMethod",
    "field",
    "get_method",
    "list_methods",
    "positive_int",
    "recent_mask",
    "register",
]
