"""The compression lifecycle, in one package (arrows point down):

    serve.py       generate / answer_many: prompts -> compress -> (append question) -> greedy decode
    replay.py      record / derive / derive_all / merge: one recorded prefill serves every method and budget (the
                   harness)
    prefill.py     compress: the compressing prefill (pseudo suffix, hook, layer-by-layer pruning, peak accounting)
    draft.py       a drafted suffix (SpecKV): the draft model writes the pseudo tokens, memoised per prompt
    stages.py      after selection: a staged method's lookahead (LAQ), renumbered positions (StreamingLLM)
    context_pass.py a context-pass method's second forward over the full prompt cache (KVzip), all layers at once
    decode.py      CompressedCache, append, greedy_decode (greedy or Sampling, streamed)
    chat.py        Chat: a conversation over one document compressed once
    decode_time.py DecodeCompression: evict back to the budget every `interval` decoded tokens
    inside.py      compressing: transformers' own model.generate with the prompt compressed by a method
    state.py       EngineState (one constructor) and select_layer, the per-layer selection
    model_info.py  what the engine reads from a model, once

Methods (`dapq.methods`) are pure tensor math behind declared protocols; `dapq.hf` adapts transformers.
"""

from .chat import Chat
from .decode import CompressedCache, Sampling, append, greedy_decode
from .decode_time import DecodeCompression
from .inside import compressing
from .model_info import ModelInfo, check_model, kv_groups, model_device, model_info, sync_device
from .prefill import compress, prefill, prefill_peak
from .replay import Derived, Recording, derive, derive_all, derive_many, merge, record, suffix_key
from .serve import MODES, GenerationOutput, answer_many, generate, resolve_method
from .stages import finish_selection
from .state import EngineState, select_layer

__all__ = [
    "MODES",
    "Chat",
    "CompressedCache",
    "DecodeCompression",
    "Derived",
    "EngineState",
    "GenerationOutput",
    "ModelInfo",
    "Recording",
    "Sampling",
    "answer_many",
    "append",
    "check_model",
    "compress",
    "compressing",
    "derive",
    "derive_all",
    "derive_many",
    "finish_selection",
    "generate",
    "greedy_decode",
    "kv_groups",
    "merge",
    "model_device",
    "model_info",
    "prefill",
    "prefill_peak",
    "record",
    "resolve_method",
    "select_layer",
    "suffix_key",
    "sync_device",
]
