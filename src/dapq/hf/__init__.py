"""The only package that touches transformers internals: the attention hook and the cache bookkeeping."""

from .attention import ATTN_NAME, EngineState, activate, enable
from .cache import make_cache

__all__ = ["ATTN_NAME", "EngineState", "activate", "enable", "make_cache"]
