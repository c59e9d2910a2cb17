"""The method interface and the registry.

A method is a `@dataclass` whose fields are its hyperparameters. The engine hands it a `LayerInputs` (plain
tensors of one layer's prefill step, `dapq.methods.inputs`) and the method returns which prompt tokens each cache
head keeps. What else a method does (a pseudo suffix, two stages, renumbered positions, per-layer budgets) it
declares by inheriting the capability classes of `dapq.methods.protocols`. Register a method with
`@register("name")`; look it up with `get_method("name", budget=128, ...)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import DapqError
from ..lazy import torch
from .inputs import LayerInputs
from .scoring import aggregate_groups, pool_scores, recent_attention, select_topk

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


def unregister(name: str) -> None:
    """Remove a registered method (for plugins and tests that register temporary methods)."""
    if name not in _REGISTRY:
        raise DapqError(f"Unknown method {name!r}. Valid methods: {', '.join(sorted(_REGISTRY))}.")
    del _REGISTRY[name]


def list_methods() -> dict[str, type[Method]]:
    """All registered methods, by name."""
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[Method]:
    """The registered class of `name`; an unknown name gives an error that lists the valid ones."""
    if name not in _REGISTRY:
        raise DapqError(f"Unknown method {name!r}. Valid methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method by name; unknown names and parameters give errors that list valid ones."""
    cls = method_class(name)
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise DapqError(
            f"Method {name!r} has no parameter(s) {', '.join(unknown)}. Its parameters: {', '.join(sorted(valid))}."
        )
    return cls(**params)


@dataclass
class Method:
    """Base of all methods. `budget`: tokens kept per head per layer (int >= 1) or a prompt ratio (0 < float < 1).

    `layout`: `kv_head` keeps one set per KV head (real memory saving; per-query-head scores are reduced over the
    GQA group with `gqa` = mean or max), `query_head` repeats KV per query head and selects per query head, as the
    KVCache-Factory reference code does (cache G times larger).
    """

    name: ClassVar[str] = "base"
    #: False for a method that never evicts and takes no budget (FullKV): sweeps, benches and the demo read this,
    #: never the method's name
    evicts: ClassVar[bool] = True
    budget: int | float | None = None
    layout: str = "kv_head"
    gqa: str = "mean"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's own `__post_init__` validates its fields; the budget is then checked against `min_budget`
        once, here, after the most derived class's validation (so `min_budget` reads checked fields)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:
            return

        def post_init(self: Method, _own: Any = own) -> None:
            _own(self)
            if type(self).__post_init__ is post_init:  # the outermost validation has run
                self.check_min_budget()

        cls.__post_init__ = post_init  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        self.check_fields()
        if type(self).__post_init__ is Method.__post_init__:  # a method without fields of its own
            self.check_min_budget()

    def check_fields(self) -> None:
        """The base fields: budget, layout, gqa (and every field's declared type)."""
        b = self.budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise DapqError(f"budget must be a number of tokens (int >= 1) or a ratio in (0, 1); got {b!r}")
            if isinstance(b, float) and b.is_integer() and b >= 1:
                raise DapqError(
                    f"budget {b} is a float: pass an int ({int(b)}) for a token count, or a ratio in (0, 1)."
                )
            if isinstance(b, float) and not 0 < b < 1:
                raise DapqError(f"budget as a ratio must be in (0, 1); got {b}. Pass an int for a token count.")
            if isinstance(b, int) and b < 1:
                raise DapqError(f"budget must be >= 1 token per head; got {b}.")
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("gqa", self.gqa, GQA_AGGREGATIONS)
        check_field_types(self)

    @property
    def min_budget(self) -> int:
        """The smallest token budget the method can evict with (windows, sinks and recent tokens fit inside it).

        Token budgets are checked against it at construction (`check_min_budget`, once for every method); ratio
        budgets by the engine once the prompt length is known (a budget that leaves the whole prompt is always
        fine)."""
        return 1

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        """Why `min_budget` is what it is, for the error of a smaller budget: (what the method keeps inside every
        budget, the parameter that sets it, what to do), e.g. ("its 32-token window", "window", "Lower window.")."""
        return ("", "", "")

    def check_min_budget(self) -> None:
        """A token budget below `min_budget` is a one-line DapqError naming what the budget must hold."""
        b, low = self.budget, self.min_budget
        if not isinstance(b, int) or isinstance(b, bool) or b >= low:
            return
        what, param, hint = self.min_budget_reason
        keeps = f"{self.name} keeps {what} inside the budget: " if what else ""
        than = f"larger than {param}" if param else f"at least {low}"
        raise DapqError(f"{keeps}budget ({b}) must be {than} (at least {low}). {hint or 'Raise the budget.'}".strip())

    # --- budgets -------------------------------------------------------------------------------------------
    @property
    def compresses(self) -> bool:
        return self.budget is not None

    def token_budget(self, prompt_len: int) -> int:
        """Tokens kept per head for a prompt of `prompt_len` real tokens (never more than the prompt)."""
        if self.budget is None:
            return prompt_len
        return max(1, min(self.budget_tokens(prompt_len), prompt_len))

    def budget_tokens(self, prompt_len: int) -> int:
        """The budget in tokens per head, a ratio taken of `prompt_len`, not capped at the prompt (decoding-time
        eviction keeps it while the cache grows past the prompt). Needs a budget."""
        assert self.budget is not None
        return math.ceil(self.budget * prompt_len) if isinstance(self.budget, float) else int(self.budget)

    # --- selection -----------------------------------------------------------------------------------------
    def select(self, inp: LayerInputs, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into [0, T) kept per cache head, and their validity: ([B, H_c, k], [B, H_c, k])."""
        raise NotImplementedError

    # --- the model it runs on -----------------------------------------------------------------------------
    @classmethod
    def model_defaults(cls, params: dict[str, Any], model_config: Any) -> dict[str, Any]:
        """Parameters that depend on the model the method runs on, for those `params` (the given ones) leave at their
        default: {name: value} (default: none). E.g. `learned` without `queries` takes the queries dapq ships for
        this model. Applied by `for_model` (an instance) and `MethodSpec.for_model` (the harness, before row keys)."""
        return {}

    def for_model(self, model_config: Any) -> Method:
        """This method, or a copy with `model_defaults` filled in for the model with `model_config`."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        extra = self.model_defaults(given, model_config)
        return dataclasses.replace(self, **extra) if extra else self

    def file_hashes(self) -> dict[str, str]:
        """The content hashes of the files this method reads (parameter name -> sha256); a run folder records them
        in run.json, so a file retrained under the same name is a new configuration, never mixed with the old."""
        return {}

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
        check_choice("pooling", self.pooling, POOLINGS)
        check_kernel(self.kernel)

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

    def decode_scores(
        self,
        queries: torch.Tensor,  # [B, H_q, n, D] the n most recent decoded tokens' rotated queries
        keys: torch.Tensor,  # [B, H_c, T, D] the cache as it is (prompt entries kept, then decoded tokens)
        visible: torch.Tensor,  # [B, H_s, n, T] bool (H_s = 1 or H_c)
        scaling: float,
    ) -> torch.Tensor:  # [B, H_c, T]
        """Scores of every cached entry for decoding-time eviction (`dapq.engine.decode_time`): the recent real
        queries stand where the method's estimated ones stood at prefill (an observation window, pseudo, drafted or
        learned queries), so every scorer scores as SnapKV's window does (the attention of those queries, summed),
        then pools with its own `pooling`/`kernel` and reduces GQA groups with its own `gqa`."""
        s = recent_attention(queries, keys, visible, scaling).sum(dim=2)  # [B, H_q, T]
        return aggregate_groups(pool_scores(s, self.pooling, self.kernel), keys.shape[1], self.gqa)


def recent_mask(inp: LayerInputs, n: int) -> torch.Tensor:  # [B, T] bool
    """The last `n` prompt tokens of every row (left padding puts them at the same indices for all rows)."""
    t = inp.prompt_len
    mask = torch.zeros(inp.valid.shape[0], t, dtype=torch.bool, device=inp.valid.device)
    if n > 0:
        mask[:, max(0, t - n) :] = True
    return mask & inp.valid[:, :t]


class KeepsRecent:
    """A scorer that also force-keeps its `keep_recent` most recent prompt tokens (DapQ, learned queries): the budget
    must hold them and one scored token. Put it before `ScorerMethod` among the bases; the method declares the
    `keep_recent` field (an int >= 0) itself."""

    @property
    def min_budget(self) -> int:
        return self.keep_recent + 1  # type: ignore[attr-defined]

    @property
    def min_budget_reason(self) -> tuple[str, str, str]:
        return (
            f"its {self.keep_recent} most recent prompt tokens",  # type: ignore[attr-defined]
            "keep_recent",
            "Lower keep_recent or raise the budget.",
        )

    def forced_keep(self, inp: LayerInputs) -> torch.Tensor | None:  # [B, T] bool
        return recent_mask(inp, self.keep_recent) if self.keep_recent else None  # type: ignore[attr-defined]


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Validate a string hyperparameter against its choices."""
    if value not in choices:
        raise DapqError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_kernel(value: Any) -> None:
    """The pooling kernel: an odd integer >= 1 (the same rule for every method that pools)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise DapqError(f"kernel must be an odd integer >= 1; got {value!r}")


# field annotations (strings under `from __future__ import annotations`) -> accepted Python types
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "str": (str,),
    "float": (float, int),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
    "float | None": (float, int, type(None)),
}
BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def check_field_types(method: Any) -> None:
    """Every hyperparameter annotated bool / int / str / float (optionally `| None`) has a value of that type
    (`True` is not an int here, and `"no"` is not a bool)."""
    for f in dataclasses.fields(method):
        want = _FIELD_TYPES.get(str(f.type))
        if want is None or f.name == "budget":
            continue
        value = getattr(method, f.name)
        ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
        if not ok:
            raise DapqError(f"{method.name}: {f.name} must be {f.type}; got {value!r} ({type(value).__name__}).")


def parse_param(cls: type[Method], name: str, text: str) -> Any:
    """A command-line value for field `name` of `cls`, converted by the field's type: booleans accept
    true/false/1/0/yes/no only, ints and floats must parse, `none` gives None where the field allows it; the budget
    is an int (token count) or a ratio in (0, 1)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if name not in fields:
        raise DapqError(f"Method {cls.name!r} has no parameter {name}. Its parameters: {', '.join(sorted(fields))}.")
    kind = str(fields[name].type)
    raw = text.strip()
    if raw.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind == "bool":
            if raw.lower() not in BOOL_TEXT:
                raise ValueError
            return BOOL_TEXT[raw.lower()]
        if name == "budget" or kind.startswith("int | float"):
            return int(raw) if raw.lstrip("+-").isdigit() else float(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        allowed = "true/false, 1/0 or yes/no" if kind == "bool" else kind
        raise DapqError(f"{cls.name}.{name} takes {allowed}; got {text!r}.") from None
    return raw


def positive_int(name: str, value: Any, minimum: int = 1) -> None:
    """Validate an integer hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DapqError(f"{name} must be an integer >= {minimum}; got {value!r}")


__all__ = [
    "LayerInputs",
    "Method",
    "ScorerMethod",
    "check_choice",
    "check_field_types",
    "check_kernel",
    "field",
    "get_method",
    "list_methods",
    "parse_param",
    "positive_int",
    "recent_mask",
    "register",
    "unregister",
]
