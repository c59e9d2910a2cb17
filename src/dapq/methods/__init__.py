"""Eviction methods, one per file. Importing this package registers them all."""

from . import dapq, full, snapkv  # noqa: F401  (registration side effect)
from .base import LayerInputs, Method, ScorerMethod, get_method, list_methods, register
from .dapq import DapQ
from .full import FullKV
from .snapkv import SnapKV

__all__ = [
    "DapQ",
    "FullKV",
    "LayerInputs",
    "Method",
    "ScorerMethod",
    "SnapKV",
    "get_method",
    "list_methods",
    "register",
]
