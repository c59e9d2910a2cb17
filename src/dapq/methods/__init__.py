"""Eviction methods, one per file. Importing this package registers them all."""

from . import (  # noqa: F401  (registration side effect)
    dapq,
    expected_attention,
    full,
    h2o,
    kvzip,
    lacache,
    laq,
    learned,
    pyramidkv,
    snapkv,
    speckv,
    streaming_llm,
)
from .base import Method, ScorerMethod, get_method, list_methods, register
from .dapq import DapQ
from .expected_attention import ExpectedAttention
from .full import FullKV
from .h2o import H2O
from .inputs import LayerInputs, layer_inputs
from .kvzip import KVzip
from .lacache import LaCache
from .laq import LAQ, LAQPlusPlus, LAQPlusPlusReference, LAQReference
from .learned import LearnedQueries
from .protocols import (
    ContextPass,
    DraftedSuffix,
    EmbeddedSuffix,
    LayerBudgetSchedule,
    PassChunk,
    PositionPolicy,
    PseudoSuffix,
    Staged,
    StageOneObservation,
    layer_budget,
    pseudo_length,
    renumbers,
)
from .pyramidkv import PyramidKV, pyramid_budgets
from .snapkv import SnapKV
from .speckv import SpecKV
from .streaming_llm import StreamingLLM

__all__ = [
    "H2O",
    "ContextPass",
    "DraftedSuffix",
    "EmbeddedSuffix",
    "LearnedQueries",
    "KVzip",
    "PassChunk",
    "SpecKV",
    "DapQ",
    "ExpectedAttention",
    "FullKV",
    "LAQ",
    "LAQPlusPlus",
    "LAQPlusPlusReference",
    "LAQReference",
    "LaCache",
    "LayerBudgetSchedule",
    "LayerInputs",
    "Method",
    "PositionPolicy",
    "PseudoSuffix",
    "PyramidKV",
    "ScorerMethod",
    "SnapKV",
    "Staged",
    "StageOneObservation",
    "StreamingLLM",
    "get_method",
    "layer_budget",
    "layer_inputs",
    "list_methods",
    "pseudo_length",
    "pyramid_budgets",
    "register",
    "renumbers",
]
