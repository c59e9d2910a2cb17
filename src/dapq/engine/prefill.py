"""The compressing prefill: prompts (+ the method's pseudo suffix) in one forward, each layer pruned by the hook
right after its attention, then the post-selection stages. `compress` serves; `prefill(..., recording=True)` is
the evaluation path's recording (`dapq.engine.replay`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import DapqError
from ..hf.adapters import SuffixAdapters, suffix_adapters
from ..hf.attention import Step, activate
from ..hf.cache import kv_bytes, make_cache
from ..methods.base import Method
from ..methods.protocols import EmbeddedSuffix, PseudoSuffix, pseudo_length
from .decode import CompressedCache
from .draft import suffix_rows
from .model_info import model_info, sync_device
from .stages import finish_selection, lookahead_stop_ids
from .state import EngineState


def prefill_peak(cache: Any, step_len: int) -> int:
    """KV bytes at the worst moment of a layer-by-layer prefill: when layer i holds its full T+N entries, layers
    before it are already compressed and layers after it are empty: max_i (sum_{j<i} compressed_j + full_i)."""
    peak, done = 0, 0
    for layer in cache.layers:
        b, h, k, d = layer.keys.shape
        per_token = b * h * d * layer.keys.element_size() * 2  # keys + values
        peak = max(peak, done + per_token * step_len)
        done += per_token * k
    return peak


def prefill_inputs(
    prompts: list[list[int]], suffix: Method | None, suffix_ids: list[list[int]] | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, position ids and validity [B, T + N] of `prompts` followed by each row's pseudo tokens
    `suffix_ids` (from `dapq.engine.draft.suffix_rows`) at `suffix`'s pseudo positions."""
    n_rows, n = len(prompts), pseudo_length(suffix)
    t = max(len(p) for p in prompts)
    ids = torch.full((n_rows, t + n), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, t + n), dtype=torch.long)
    valid = torch.zeros((n_rows, t + n), dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        pad = t - len(prompt)
        ids[b, pad:t] = torch.tensor(prompt)
        pos[b, pad:t] = torch.arange(len(prompt))
        valid[b, pad:] = True
        if n:
            assert isinstance(suffix, PseudoSuffix)
            assert suffix_ids is not None and len(suffix_ids[b]) == n
            ids[b, t:] = torch.tensor(suffix_ids[b])
            pos[b, t:] = torch.tensor(suffix.pseudo_positions(len(prompt)))
    return ids, pos, valid


def prefill_embeddings(model: Any, method: Method, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[B, T + N, hidden] input embeddings of `ids` (the model's own table) with an `EmbeddedSuffix` method's
    vectors at the suffix columns [T, T + N)."""
    assert isinstance(method, EmbeddedSuffix)
    embeds = model.get_input_embeddings()(ids)
    suffix = method.suffix_embeddings(model.config)
    if suffix.dim() != 2 or suffix.shape[1] != embeds.shape[-1]:
        raise DapqError(
            f"{method.name}: suffix embeddings {tuple(suffix.shape)} do not fit hidden size {embeds.shape[-1]}."
        )
    embeds[:, prompt_len:] = suffix.to(device=embeds.device, dtype=embeds.dtype)
    return embeds


def prefill(
    model: Any, tokenizer: Any, prompts: list[list[int]], method: Method, *, recording: bool = False
) -> CompressedCache:
    """Prefill `prompts` (token id lists, one per row) with the method's pseudo suffix; compress layer by layer
    (or, `recording=True`, keep the full prompt KV and every layer's LayerInputs, see `dapq.engine.replay`)."""
    method = method.for_model(model.config)  # e.g. `learned` without a file: the queries shipped for this model
    info = model_info(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DapqError("Empty prompt: every row needs at least one token.")
    lengths = [len(p) for p in prompts]
    t, n = max(lengths), pseudo_length(method)
    suffix_ids, draft_costs = suffix_rows(method, model, prompts, tokenizer, memo=recording) if n else (None, {})
    ids, pos, valid = prefill_inputs(prompts, method, suffix_ids, int(tokenizer.pad_token_id or 0))
    if info.max_positions is not None and int(pos.max()) >= info.max_positions:
        raise DapqError(
            f"The prompt ({t} tokens{f' + {n} pseudo tokens' if n else ''}) reaches position {int(pos.max())}, beyond "
            f"the model's maximum of {info.max_positions} positions. Shorten the context or use a long-context model."
        )
    budgets = [0] * len(prompts) if recording else None  # recording: every (non-sliding) layer is observed
    # a recording is per KV head whatever the suffix method's layout (derive lays it out per method)
    cache = make_cache(info.n_layers) if recording else None
    state = EngineState.create(info, method, lengths, budgets=budgets, cache=cache, recording=recording)
    cache, device = state.cache, info.device
    ids, pos, valid = ids.to(device), pos.to(device), valid.to(device)
    state.set_step(Step(pos=pos, valid=valid, prompt_len=t))
    sync_device(device)
    start = time.perf_counter()
    embedded = bool(n) and isinstance(method, EmbeddedSuffix)
    adapters = method.suffix_adapters() if embedded else None  # type: ignore[union-attr]
    with (
        activate(list(info.configs), state),
        torch.inference_mode(),
        suffix_adapters(model, SuffixAdapters.from_dict(adapters) if adapters else None, n),
    ):
        tokens = {"inputs_embeds": prefill_embeddings(model, method, ids, t)} if embedded else {"input_ids": ids}
        out = model(
            **tokens,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor([t - 1], device=device),
        )
    sync_device(device)
    prefill_s = time.perf_counter() - start
    state.set_step(None)
    first_logits = out.logits[:, -1].float()
    kv_peak = prefill_peak(cache, t + n)
    lookahead_s = pass_s = 0.0
    if recording:
        next_pos = torch.tensor(lengths, device=device)
    else:
        start = time.perf_counter()
        stops = lookahead_stop_ids(method, tokenizer)
        next_pos, stage_peak, pass_s = finish_selection(
            model, state, first_logits, lengths, prompts=prompts, tokenizer=tokenizer, stop_ids=stops
        )
        sync_device(device)
        if stage_peak is not None:
            kv_peak = stage_peak
            lookahead_s = time.perf_counter() - start - pass_s
    itemsize = cache.layers[0].keys.element_size()
    stats = {
        "method": method.describe(),
        "prompt_tokens": lengths,
        "pseudo_tokens": n,
        "budget_tokens": [int(b) for b in state.row_budgets],
        "kept_per_layer": [round(k, 2) for k in state.kept],
        "kept_mean": round(sum(state.kept) / len(state.kept), 2),  # PyramidKV: the real mean next to the budget
        "kv_bytes_full": 2 * info.n_layers * len(prompts) * t * info.n_kv_heads * info.head_dim * itemsize,
        "kv_bytes_compressed": kv_bytes(cache),
        # accounted, not allocator-measured: compressed layers + one full layer (layer-by-layer methods), or
        # full cache + stage-1 cache + lookahead entries (staged methods: LAQ), or full cache + one chunk of the
        # context pass (KVzip). A draft's own KV is reported apart (draft_kv_bytes_peak).
        "kv_bytes_peak": kv_peak,
        # everything before the first token: prefill, lookahead, context pass, draft
        "prefill_s": prefill_s + lookahead_s + pass_s + draft_costs.get("draft_s", 0.0),
        "lookahead_s": lookahead_s,
        "pass_s": pass_s,
        **draft_costs,
    }
    return CompressedCache(model, cache, state, first_logits, next_pos, lengths, stats)


def compress(model: Any, tokenizer: Any, prompts: list[list[int]], method: Method) -> CompressedCache:
    """Prefill `prompts` (token id lists, one per row) with the method's pseudo suffix and compress layer by layer.

    Returns the compressed cache, the first-token logits (computed with the full KV), each row's next position and
    stats (kept tokens per layer, KV bytes full / compressed / accounted peak, timings)."""
    return prefill(model, tokenizer, prompts, method)
