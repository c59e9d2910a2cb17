"""dapq: KV-cache eviction with decoding-aligned, position-aware pseudo queries, and the baselines it is measured
against, for Hugging Face transformers models.

    from dapq import load_model, DapQ, generate
    model, tok = load_model()                      # bundled SmolLM2-135M-Instruct, offline
    out = generate(model, tok, context, question, method=DapQ(budget=128))
"""

from .engine import GenerationOutput, answer_many, compress, generate
from .errors import DapqError
from .methods import DapQ, FullKV, LayerInputs, Method, ScorerMethod, SnapKV, get_method, list_methods, register
from .models import load_model
from .prompts import build_prompt

__version__ = "0.1.0"

__all__ = [
    "DapQ",
    "DapqError",
    "FullKV",
    "GenerationOutput",
    "LayerInputs",
    "Method",
    "ScorerMethod",
    "SnapKV",
    "answer_many",
    "build_prompt",
    "compress",
    "generate",
    "get_method",
    "list_methods",
    "load_model",
    "register",
]
