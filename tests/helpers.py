"""Helpers shared by the tests (imported as `helpers`: pytest puts tests/ on sys.path).

Tiny random models built from configs (no downloads), a character tokenizer stub, and references computed with plain
transformers only (never through dapq's hook).

Tiny models: hidden 64, 3 layers, 4 query heads / 2 KV heads (GQA groups of 2; qwen2_gqa7: 14 / 2), head dim 16,
vocab 128, 512 positions, seeded. `initializer_range` is raised from 0.02 to 0.2 so attention is peaked rather than
near uniform: the top-k checks then test real rankings instead of near-ties.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

transformers.logging.set_verbosity_error()

VOCAB = 128
MAX_POS = 512
N_LAYERS = 3
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
_GEMMA_EXTRA = {"sliding_window": 16, "layer_types": _GEMMA_LAYERS, "query_pre_attn_scalar": 16}


@dataclass(frozen=True)
class TinySpec:
    config: str  # class names in transformers
    model: str
    attn: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)


TINY = {
    "llama": TinySpec("LlamaConfig", "LlamaForCausalLM"),
    "llama_eager": TinySpec("LlamaConfig", "LlamaForCausalLM", attn="eager"),
    "qwen2": TinySpec("Qwen2Config", "Qwen2ForCausalLM"),
    # Qwen2.5-0.5B's head arithmetic: 14 query / 2 KV heads (GQA groups of 7), head dim 16 (q_proj 64 -> 224)
    "qwen2_gqa7": TinySpec("Qwen2Config", "Qwen2ForCausalLM", extra={"num_attention_heads": 14}),
    "qwen3": TinySpec("Qwen3Config", "Qwen3ForCausalLM"),  # q_norm / k_norm
    # Mistral v0.2/v0.3 style (no sliding window)
    "mistral": TinySpec("MistralConfig", "MistralForCausalLM", extra={"sliding_window": None}),
    # Mistral v0.1 style: every layer has a window (16 < prompt); such layers are evicted, the mask applies the window
    "mistral_window": TinySpec("MistralConfig", "MistralForCausalLM", extra={"sliding_window": 16}),
    "phi3": TinySpec("Phi3Config", "Phi3ForCausalLM"),  # fused qkv projection
    "gemma": TinySpec("GemmaConfig", "GemmaForCausalLM"),
    # soft-capping and alternating sliding / full layers (window 16 < prompt): eager attention
    "gemma2": TinySpec("Gemma2Config", "Gemma2ForCausalLM", attn="eager", extra=_GEMMA_EXTRA),
    "gemma3": TinySpec("Gemma3TextConfig", "Gemma3ForCausalLM", attn="eager", extra=_GEMMA_EXTRA),
}


def tiny_queries_file(n: int = 6, seed: int = 0) -> str:
    """A learned-queries file for the tiny models (n random embeddings of their hidden size), written once."""
    from dapq.methods.learned import save_queries

    path = Path(tempfile.gettempdir()) / f"dapq-tiny-queries-{os.getpid()}-{n}-{seed}.pt"
    if not path.exists():
        g = torch.Generator().manual_seed(seed)
        save_queries(path, torch.randn(n, _COMMON["hidden_size"], generator=g) * 0.2, model="tiny")
    return str(path)


TINY_QUERIES = tiny_queries_file()

# per-method parameters that make tiny prompts meaningful (a window of 32 would not fit a budget of 12)
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "snapkv": {"window": 4},
    "pyramidkv": {"window": 4},
    "dapq": {"n_pseudo_tokens": 8},
    "h2o": {"recent": 4},
    "laq": {"stage1_window": 4, "n_lookahead": 3},
    "laq++": {"stage1_window": 4, "n_lookahead": 3, "prompt_queries": 4},
    "speckv": {"n_draft": 6},
    "kvzip": {"chunk_size": 16},
    "learned": {"queries": TINY_QUERIES},  # several reconstruction chunks even for the tiny prompts
    "laq_reference": {"stage1_window": 4, "n_lookahead": 3},
    "laq++_reference": {"stage1_window": 4, "n_lookahead": 3, "prompt_queries": 4},
}

_MODELS: dict[str, Any] = {}


def build_tiny(name: str) -> Any:
    """A seeded tiny random model of family `name` (cached per session: tests must not modify it)."""
    if name not in _MODELS:
        spec = TINY[name]
        cfg = getattr(transformers, spec.config)(**{**_COMMON, **spec.extra})
        cfg._attn_implementation = spec.attn
        torch.manual_seed(0)
        model = getattr(transformers, spec.model)(cfg).eval()
        assert model.config._attn_implementation == spec.attn
        _MODELS[name] = model
    return _MODELS[name]


def toy_samples(n: int, chars: int = 60, max_new_tokens: int = 4, long_one: int | None = None) -> list[Any]:
    """n harness samples of `chars` letters each (one id per sample: s0, s1, ...) for the tiny models; sample
    `long_one` gets 600 letters, more than the tiny models' 512 positions (an error in any worker)."""
    from dapq.tasks.sample import Sample

    out = []
    for i in range(n):
        length = 600 if i == long_one else chars
        out.append(
            Sample(
                id=f"s{i}",
                task="toy",
                context="".join(chr(97 + (i * 7 + j) % 26) for j in range(length)),
                question=f"q{i}?",
                references=["a"],
                metric="string_match_all",
                max_new_tokens=max_new_tokens,
                metadata={"length": length},
            )
        )
    return out


def sliding_layers(model: Any) -> list[bool]:
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [t == "sliding_attention" for t in types]


class TinyTokenizer:
    """Character-level tokenizer stub: ids 3..127 for characters, 0 = pad, 1 = bos, 2 = eos; no chat template."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i - 3) if i >= 3 else ("" if skip_special_tokens else f"<{i}>") for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": 0, "<s>": 1, "</s>": 2}


def random_prompt(length: int, seed: int) -> list[int]:
    """`length` random token ids in [3, VOCAB) (never pad / bos / eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def kept_sets(cc: Any, layer: int) -> list[set[int]]:
    """The kept prompt positions of each cache head of row 0 at `layer`."""
    track = cc.state.tracks[layer]
    h = cc.cache.layers[layer].keys.shape[1]
    pos, valid = track.pos[0].expand(h, -1), track.valid[0].expand(h, -1)
    return [set(pos[j][valid[j]].tolist()) for j in range(h)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------------- references
def plain_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Plain transformers greedy loop (its own cache, masks and positions): tokens and each step's logits [V].

    logits[0] are the prompt's last-token logits, logits[i] the logits after feeding tokens[i - 1].
    """
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        for _ in range(steps):
            step_logits = out.logits[0, -1].float()
            logits.append(step_logits)
            tokens.append(int(step_logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
    return tokens, logits


def until_stop(tokens: list[int], stops: Any) -> list[int]:
    """The tokens before the first stop token (what dapq's decoders return)."""
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return out


def cache_from_tensors(dapq_cache: Any) -> DynamicCache:
    """A plain transformers DynamicCache holding copies of a dapq cache's keys/values (kv_head layout)."""
    cache = DynamicCache()
    for i, layer in enumerate(dapq_cache.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


_CAPTURE = "dapq_test_capture"
_CAPTURED: list[dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = []
_CAPTURED_VALUES: list[dict[int, torch.Tensor] | None] = []


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _CAPTURED:
        _CAPTURED[-1][module.layer_idx] = (query.detach().clone(), key.detach().clone(), float(scaling))
        if _CAPTURED_VALUES[-1] is not None:
            _CAPTURED_VALUES[-1][module.layer_idx] = value.detach().clone()
    kwargs.pop("is_causal", None)
    kwargs.pop("sliding_window", None)
    kwargs.pop("softcap", None)
    return sdpa_attention_forward(
        module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=query.shape[2] > 1, **kwargs
    )


@contextlib.contextmanager
def capture_qk(
    model: Any, values: dict[int, torch.Tensor] | None = None
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Run `model` through plain causal sdpa attention that records every layer's rotated queries and keys.

    Yields {layer_idx: (queries [B, H_q, S, D], keys [B, H_kv, S, D], scaling)}; `values`, if given, is filled with
    {layer_idx: values [B, H_kv, S, D]}. Independent of dapq's hook; valid for unpadded rows with increasing positions
    and models without sliding windows or soft-capping.
    """
    AttentionInterface.register(_CAPTURE, _capture_attention)
    configs = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = cfg
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    _CAPTURED.append({})
    _CAPTURED_VALUES.append(values)
    try:
        for c in configs.values():
            c._attn_implementation_internal = _CAPTURE
        yield _CAPTURED[-1]
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]
        _CAPTURED.pop()
        _CAPTURED_VALUES.pop()


def plain_rotary(model: Any) -> Any:
    """positions [B, S] -> (cos, sin) [B, S, D] from the model's own rotary module (LayerInputs.rotary, not dapq's)."""
    rotary = model.model.rotary_emb

    def at(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(torch.empty(0), position_ids=positions)
        return cos.float(), sin.float()

    return at


# ---------------------------------------------------------------------------------------------------- Ray workers
def tiny_loader(family: str = "llama") -> tuple[Any, Any]:
    """(tiny model, tokenizer stub) for a Ray worker process (`WorkerSpec(loader=...)`)."""
    return build_tiny(family), TinyTokenizer()


@dataclass(frozen=True)
class DyingLoader:
    """A worker loader whose process kills itself (os._exit, as the OOM killer would end it: no exception, no
    cleanup) at its `after`-th model forward, if `marker` does not exist yet; it creates the marker first, so exactly
    one worker of a sweep dies, once. A forward = a pass through the first decoder layer."""

    marker: str
    after: int = 3

    def __call__(self) -> tuple[Any, Any]:
        model, tok = tiny_loader()
        calls = [0]

        def maybe_die(module: Any, args: Any) -> None:
            calls[0] += 1
            if calls[0] >= self.after and not os.path.exists(self.marker):
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)

        model.model.layers[0].register_forward_pre_hook(maybe_die)  # every forward passes the first layer
        return model, tok


@dataclass(frozen=True)
class SlowLoader:
    """A worker loader whose model sleeps `delay` seconds before every forward (a sweep slow enough to kill)."""

    delay: float = 0.05

    def __call__(self) -> tuple[Any, Any]:
        import time

        model, tok = tiny_loader()
        model.model.layers[0].register_forward_pre_hook(lambda module, args: time.sleep(self.delay))
        return model, tok
