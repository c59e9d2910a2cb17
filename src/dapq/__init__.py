"""dapq: KV-cache eviction with decoding-aligned, position-aware pseudo queries, and the baselines it is measured
against, for Hugging Face transformers models.

    from dapq import load_model, DapQ, generate
    model, tok = load_model()                      # bundled SmolLM2-135M-Instruct, offline
    out = generate(model, tok, context, question, method=DapQ(budget=128))

`import dapq` is cheap: the public names below are imported from their modules on first use (torch and transformers
load when you first touch `generate`, `load_model`, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DapqError

__version__ = "0.2.0"

#: public name -> the submodule it comes from
_LAZY = {
    "Chat": "engine",
    "GenerationOutput": "engine",
    "Sampling": "engine",
    "answer_many": "engine",
    "compress": "engine",
    "compressing": "engine",
    "generate": "engine",
    "build_prompt": "prompts",
    "DapQ": "methods",
    "DecodeCompression": "engine",
    "FullKV": "methods",
    "LayerInputs": "methods",
    "Method": "methods",
    "ScorerMethod": "methods",
    "SnapKV": "methods",
    "get_method": "methods",
    "list_methods": "methods",
    "register": "methods",
    "load_model": "models",
}

__all__ = [
    "Chat",
    "DapQ",
    "DapqError",
    "DecodeCompression",
    "FullKV",
    "GenerationOutput",
    "LayerInputs",
    "Method",
    "Sampling",
    "ScorerMethod",
    "SnapKV",
    "answer_many",
    "build_prompt",
    "compress",
    "compressing",
    "generate",
    "get_method",
    "list_methods",
    "load_model",
    "register",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports these on first use
    from .engine import (
        Chat,
        DecodeCompression,
        GenerationOutput,
        Sampling,
        answer_many,
        compress,
        compressing,
        generate,
    )
    from .methods import DapQ, FullKV, LayerInputs, Method, ScorerMethod, SnapKV, get_method, list_methods, register
    from .models import load_model
    from .prompts import build_prompt


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dapq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
