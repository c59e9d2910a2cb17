"""The draft model of a `DraftedSuffix` method (SpecKV): it reads each prompt and greedily writes the suffix tokens.

`draft_suffix(method, model, prompts)` resolves the draft ("self": the target with its own full cache; a loaded
model; a local folder or hub id, loaded once per process on the target's device and dtype), prefills each prompt
with plain attention and a full cache, and decodes exactly `n_pseudo` greedy tokens (no stop at end-of-sequence:
the suffix has a fixed length). In the harness (`memo=True`) results are memoised per (draft, n, prompt), so a
recording's key, its prefill and the derived methods run the draft once and all report its cost; serving
(`compress`, `generate`) runs the draft every time, so its time is inside the measured TTFT. The draft's time and
KV bytes come with the tokens: the engine reports them (`stats["draft_s"]`, `stats["draft_kv_bytes_peak"]`) next
to the target's own peak.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..errors import DapqError
from ..hf.cache import kv_bytes
from ..methods.protocols import DraftedSuffix
from .model_info import model_info, sync_device

_MEMO: OrderedDict[tuple, Drafted] = OrderedDict()
_MEMO_SIZE = 64
_LOADED: dict[str, Any] = {}


@dataclass
class Drafted:
    """The draft's tokens for one prompt and what writing them cost."""

    ids: list[int]
    seconds: float
    kv_bytes_peak: int
    draft: Any  # keeps the draft model alive while the memo refers to it by id


def resolve_draft(method: DraftedSuffix, model: Any) -> Any:
    """The draft model of `method` for the target `model`."""
    draft = method.draft_model
    if isinstance(draft, str):
        if draft == "self":
            return model
        if draft not in _LOADED:
            _LOADED[draft] = load_draft(draft, model)
        draft = _LOADED[draft]
    if not hasattr(draft, "forward") or not hasattr(draft, "config"):
        raise DapqError(f"draft must be 'self', a loaded causal LM, a local folder or a hub id; got {draft!r}")
    target_vocab, draft_vocab = model_info(model).vocab_size, model_info(draft).vocab_size
    if target_vocab != draft_vocab:
        raise DapqError(
            f"The draft model's vocabulary ({draft_vocab} tokens) differs from the target's ({target_vocab}): the "
            "draft must share the target's tokenizer (e.g. a smaller model of the same family)."
        )
    return draft


def load_draft(name: str, target: Any) -> Any:
    """A draft model from a local folder, a hub id, a .gguf file or a known offline model's name (`dapq models`), on
    the target's device and dtype (its tokenizer is the target's: only the model is loaded)."""
    from ..models import gguf_sources, load_model

    device, dtype = model_info(target).device, next(target.parameters()).dtype
    if gguf_sources(name) is not None:  # a known offline model or a .gguf file: through the conversion cache
        return load_model(name, dtype=dtype, device=device)[0]
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    except OSError as exc:
        raise DapqError(
            f"Could not load the draft model {name!r}: pass a local folder with config.json and weights, a hub id on "
            "a machine with network access, or draft='self'."
        ) from exc


def draft_suffix(method: DraftedSuffix, model: Any, prompts: list[list[int]], memo: bool = True) -> list[Drafted]:
    """The draft's `method.n_pseudo` greedy tokens after each prompt (memoised unless `memo=False`)."""
    draft = resolve_draft(method, model)
    n = method.n_pseudo
    out = []
    for prompt in prompts:
        key = (id(draft), n, tuple(prompt))
        if not memo:
            out.append(write(draft, prompt, n))
            continue
        if key not in _MEMO:
            _MEMO[key] = write(draft, prompt, n)
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
        _MEMO.move_to_end(key)
        out.append(_MEMO[key])
    return out


def write(draft: Any, prompt: list[int], n: int) -> Drafted:
    """Greedy decoding of `n` tokens after `prompt` with a full cache (plain attention, batch of one)."""
    device = model_info(draft).device
    sync_device(device)
    start = time.perf_counter()
    cache = DynamicCache()
    ids = torch.tensor([prompt], device=device)
    tokens: list[int] = []
    with torch.inference_mode():
        out = draft(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for step in range(n):
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            if step == n - 1:
                break
            pos = torch.tensor([[len(prompt) + step]], device=device)
            out = draft(
                input_ids=torch.tensor([[tok]], device=device),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
    sync_device(device)
    return Drafted(tokens, time.perf_counter() - start, kv_bytes(cache), draft)


def suffix_rows(
    method: Any, model: Any, prompts: list[list[int]], tokenizer: Any = None, memo: bool = True
) -> tuple[list[list[int]], dict]:
    """Each row's pseudo-suffix token ids for `method` (a draft writes them for a `DraftedSuffix`, memoised unless
    `memo=False`), and the draft's costs for the stats ({} without a draft)."""
    info = model_info(model)
    if isinstance(method, DraftedSuffix):
        drafted = draft_suffix(method, model, prompts, memo)
        costs = {
            "draft_s": sum(d.seconds for d in drafted),
            "draft_kv_bytes_peak": max(d.kv_bytes_peak for d in drafted),
        }
        return [d.ids for d in drafted], costs
    return [list(method.pseudo_ids(list(p), info.vocab_size, tokenizer)) for p in prompts], {}
