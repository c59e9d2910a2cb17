"""Eviction methods, one per file. Importing this package registers them all."""

from . import dapq, full, h2o, lacache, laq, pyramidkv, snapkv, streaming_llm  # noqa: F401  (registration side effect)
from .base import LayerInputs, Method, ScorerMethod, get_method, list_methods, register
from .dapq import DapQ
from .full import FullKV
from .h2o import H2O
from .lacache import LaCache
from .laq import LAQ, LAQPlusPlus
from .pyramidkv import PyramidKV, pyramid_budgets
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

__all__ = [
    "H2O",
    "DapQ",
    "FullKV",
    "LAQ",
    "LAQPlusPlus",
    "LaCache",
    "LayerInputs",
    "Method",
    "PyramidKV",
    "ScorerMethod",
    "SnapKV",
    "StreamingLLM",
    "get_method",
    "list_methods",
    "pyramid_budgets",
    "register",
]
