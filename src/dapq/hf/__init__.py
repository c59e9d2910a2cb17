"""The only package that touches transformers internals: the attention hook, cache layers, RoPE, query capture."""

from .attention import ATTN_NAME, HookState, Step, activate, enable
from .cache import make_cache

__all__ = ["ATTN_NAME", "HookState", "Step", "activate", "enable", "make_cache"]
