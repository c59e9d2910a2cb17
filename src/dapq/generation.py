"""Prefill -> compress -> greedy decode, with explicit position ids, batches and two compression modes.

    from dapq import load_model, DapQ, generate
    model, tok = load_model()
    out = generate(model, tok, context, question, method=DapQ(budget=128))
    print(out.text, out.stats)

Query-aware mode (the paper): the whole prompt (context, question, chat template) is prefilled and compressed.
Question-agnostic mode: only the context part is compressed; the question part is appended after the compressed
cache at the positions following the context; `answer_many` answers several questions against one compressed
context, restoring the cache between them. Batches are left-padded: each row has its own prompt length, pseudo
positions and kept set, and pad keys are never kept or attended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DapqError
from .hf.attention import EngineState, Step, activate, model_attn_implementation
from .hf.cache import LayerTrack, gather_tokens, kv_bytes, make_cache, reserve, restore, set_layer, snapshot
from .methods.base import Method, get_method
from .methods.full import FullKV
from .prompts import build_prompt, stop_token_ids

MODES = ("query_aware", "question_agnostic")


@dataclass
class GenerationOutput:
    """`text` (str for a single prompt, list for a batch), `token_ids` per row, and `stats`."""

    text: str | list[str]
    token_ids: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- checks
def check_model(model: Any) -> None:
    """Refuse models the hook cannot serve, with a message that says why."""
    if not getattr(model, "_supports_attention_backend", False):
        raise DapqError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, which dapq "
            "hooks. Use a model class that supports attn_implementation (Llama, Mistral, Qwen2/3, Phi3, Gemma, ...)."
        )
    cfg = _text_config(model)
    has_rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    has_rope = has_rope or any(name.endswith("rotary_emb") for name, _ in model.named_modules())
    if not has_rope:
        raise DapqError(
            f"{type(model).__name__} has no rotary position embeddings. dapq's methods keep the original RoPE "
            "positions of kept tokens (and DapQ places pseudo queries by position): use a RoPE model."
        )


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def kv_groups(model: Any) -> int:
    """Query heads per KV head (the GQA group size G)."""
    cfg = _text_config(model)
    return cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def _max_positions(model: Any) -> int | None:
    cfg = _text_config(model)
    return getattr(cfg, "max_position_embeddings", None)


def _n_layers(model: Any) -> int:
    cfg = _text_config(model)
    return int(cfg.num_hidden_layers)


def _sliding_layers(model: Any) -> list[bool]:
    cfg = _text_config(model)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * _n_layers(model)
    return [t == "sliding_attention" for t in types]


def resolve_method(method: Method | str | None, **params: Any) -> Method:
    if method is None:
        return FullKV()
    if isinstance(method, str):
        return get_method(method, **params)
    if not isinstance(method, Method):
        raise DapqError(f"method must be a dapq Method or a method name; got {type(method).__name__}")
    return method


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class CompressedCache:
    """A compressed prompt cache, ready to decode from: `next_pos` [B] is where each row's next token goes."""

    model: Any
    cache: Any
    state: EngineState
    first_logits: torch.Tensor  # [B, V] logits of the last prompt token (computed with the full KV)
    next_pos: torch.Tensor  # [B] long
    prompt_lengths: list[int]
    stats: dict[str, Any]


def _device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def compress(model: Any, tokenizer: Any, prompts: list[list[int]], method: Method) -> CompressedCache:
    """Prefill `prompts` (token id lists, one per row) with the method's pseudo suffix and compress layer by layer."""
    check_model(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DapqError("Empty prompt: every row needs at least one token.")
    device = _device(model)
    n_rows, n = len(prompts), method.n_pseudo
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    max_pos = _max_positions(model)
    ids = torch.full((n_rows, t + n), int(tokenizer.pad_token_id or 0), dtype=torch.long)
    pos = torch.zeros((n_rows, t + n), dtype=torch.long)
    valid = torch.zeros((n_rows, t + n), dtype=torch.bool)
    vocab = model.get_input_embeddings().weight.shape[0]
    for b, prompt in enumerate(prompts):
        pad = t - len(prompt)
        ids[b, pad:t] = torch.tensor(prompt)
        pos[b, pad:t] = torch.arange(len(prompt))
        valid[b, pad:] = True
        if n:
            ids[b, t:] = torch.tensor(method.pseudo_ids(list(prompt), vocab, tokenizer))
            pos[b, t:] = torch.tensor(method.pseudo_positions(len(prompt)))
    if max_pos is not None and int(pos.max()) >= max_pos:
        raise DapqError(
            f"The prompt ({t} tokens{f' + {n} pseudo tokens' if n else ''}) reaches position {int(pos.max())}, beyond "
            f"the model's maximum of {max_pos} positions. Shorten the context or use a long-context model."
        )
    cfg = _text_config(model)
    groups = kv_groups(model)
    cache = make_cache(_n_layers(model), method.layout, groups)
    state = EngineState(
        cache=cache,
        method=method,
        n_layers=_n_layers(model),
        inner=model_attn_implementation(model),
        row_budgets=torch.tensor([method.token_budget(length) for length in lengths], device=device),
        row_lengths=torch.tensor(lengths, device=device),
        sliding=_sliding_layers(model),
    )
    ids, pos, valid = ids.to(device), pos.to(device), valid.to(device)
    state.set_step(Step(pos=pos, valid=valid, prompt_len=t))
    _sync(device)
    start = time.perf_counter()
    with activate(model, state), torch.inference_mode():
        out = model(
            input_ids=ids,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor([t - 1], device=device),
        )
    _sync(device)
    prefill_s = time.perf_counter() - start
    state.step = None
    state.prefill_mask = None
    first_logits = out.logits[:, -1].float()
    kv_peak = _prefill_peak(cache, t + n)
    next_pos = torch.tensor(lengths, device=device)
    if method.renumbers_positions:
        next_pos = _renumber_positions(model, cache, state)
    lookahead_s = 0.0
    if method.lookahead_tokens and any(o is not None for o in state.observed):
        start = time.perf_counter()
        kv_peak = _lookahead_stage(model, cache, state, first_logits, torch.tensor(lengths, device=device), groups)
        _sync(device)
        lookahead_s = time.perf_counter() - start
    n_q = cfg.num_attention_heads
    n_kv = n_q // groups
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    itemsize = cache.layers[0].keys.element_size()
    stats = {
        "method": method.describe(),
        "prompt_tokens": lengths,
        "pseudo_tokens": n,
        "budget_tokens": [int(b) for b in state.row_budgets],
        "kept_per_layer": [round(k, 2) for k in state.kept],
        "kept_mean": round(sum(state.kept) / len(state.kept), 2),  # PyramidKV: the real mean next to the budget
        "kv_bytes_full": 2 * _n_layers(model) * n_rows * t * n_kv * head_dim * itemsize,
        "kv_bytes_compressed": kv_bytes(cache),
        # accounted, not allocator-measured: compressed layers + one full layer (layer-by-layer methods), or
        # full cache + stage-1 cache + lookahead entries (LAQ)
        "kv_bytes_peak": kv_peak,
        "prefill_s": prefill_s + lookahead_s,
        "lookahead_s": lookahead_s,
    }
    return CompressedCache(
        model=model,
        cache=cache,
        state=state,
        first_logits=first_logits,
        next_pos=next_pos,
        prompt_lengths=lengths,
        stats=stats,
    )


def _prefill_peak(cache: Any, step_len: int) -> int:
    """KV bytes at the worst moment of a layer-by-layer prefill: when layer i holds its full T+N entries, layers
    before it are already compressed and layers after it are empty: max_i (sum_{j<i} compressed_j + full_i)."""
    peak, done = 0, 0
    for layer in cache.layers:
        b, h, k, d = layer.keys.shape
        per_token = b * h * d * layer.keys.element_size() * 2  # keys + values
        peak = max(peak, done + per_token * step_len)
        done += per_token * k
    return peak


def _lookahead_stage(
    model: Any, cache: Any, state: EngineState, first_logits: torch.Tensor, next_pos: torch.Tensor, groups: int
) -> int:
    """LAQ's stages 2-4 on a full prompt cache: build the stage-1 cache from the observed selections, decode the
    lookahead tokens on it at positions L.. while capturing their queries, then select from the full cache with
    them. Returns the peak KV bytes (full + stage-1 + lookahead). The lookahead tokens leave nothing behind."""
    method = state.method
    stage1 = make_cache(state.n_layers, method.layout, groups)
    s1_state = EngineState(
        cache=stage1,
        method=method,
        n_layers=state.n_layers,
        inner=state.inner,
        row_budgets=state.row_budgets,
        row_lengths=state.row_lengths,
        sliding=state.sliding,
    )
    s1_state.configs = state.configs
    for i, layer in enumerate(cache.layers):
        obs = state.observed[i]
        if obs is None:  # not evicted (sliding layer, or budget >= prompt): the stage-1 layer is the full one
            set_layer(stage1.layers[i], layer.keys, layer.values)
            track = state.tracks[i]
            s1_state.tracks[i] = LayerTrack(track.pos, track.valid, track.all_valid)  # a copy: decoding appends to it
            continue
        idx, kept_valid = obs["stage1"]  # [B, H_c, k]
        set_layer(stage1.layers[i], gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx))
        track = state.tracks[i]
        pos = track.pos.expand(-1, idx.shape[1], -1).gather(-1, idx)
        s1_state.tracks[i] = LayerTrack(pos, kept_valid)
    s1_state.capture = [[] for _ in range(state.n_layers)]
    s1 = CompressedCache(model, stage1, s1_state, first_logits, next_pos.clone(), [], {})
    greedy_decode(s1, first_logits, method.lookahead_tokens + 1, set())  # n forward steps at L .. L+n-1
    peak = kv_bytes(cache) + kv_bytes(stage1)
    for i, layer in enumerate(cache.layers):
        obs = state.observed[i]
        if obs is None:
            continue
        lookahead_q = torch.cat(s1_state.capture[i], dim=2)  # [B, H_q, n, D]
        track = state.tracks[i]  # the full prompt: pos/valid [B, 1, T]
        idx, kept_valid = method.stage2_select(lookahead_q, layer.keys, track.pos[:, 0], track.valid[:, 0], obs)
        layer.keys, layer.values = gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx)
        state.tracks[i] = LayerTrack(track.pos.expand(-1, idx.shape[1], -1).gather(-1, idx), kept_valid)
        state.kept[i] = float(kept_valid.sum(-1).float().mean())
        state.observed[i] = None
    return peak


def _renumber_positions(model: Any, cache: Any, state: EngineState) -> torch.Tensor:
    """Re-rotate every layer's kept keys to contiguous positions 0..k-1 (row order kept); returns each row's next
    position k. Needs the same kept count per row in every layer and head (StreamingLLM with a uniform budget)."""
    from .hf.rope import rerotate_keys, rotary_module

    if any(state.sliding):
        raise DapqError("rerotate=True is not supported for models with sliding-window layers: use rerotate=False.")
    rotary = rotary_module(model)
    counts = None
    for layer, track in zip(cache.layers, state.tracks):
        assert track is not None
        kept = track.valid.sum(-1)  # [B, H_s]
        if counts is None:
            counts = kept[:, 0]
        if not bool((kept == counts[:, None]).all()):
            raise DapqError("rerotate=True needs every layer and head to keep the same number of tokens per row.")
        # valid entries come first in ascending original order (select_topk); filler slots go to the end
        rank = torch.cumsum(track.valid.long(), dim=-1) - 1  # [B, H_s, T]
        new = torch.where(track.valid, rank, track.pos)
        h = layer.keys.shape[1]
        layer.keys = rerotate_keys(rotary, layer.keys, track.pos.expand(-1, h, -1), new.expand(-1, h, -1))
        track.pos = new
    assert counts is not None
    return counts.to(torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(cc: CompressedCache, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Feed a chunk [B, q] after the cache; returns the last column's logits [B, V]."""
    cc.state.set_step(Step(pos=pos, valid=valid))
    with activate(cc.model, cc.state), torch.inference_mode():
        out = cc.model(input_ids=ids, position_ids=pos, past_key_values=cc.cache, use_cache=True, logits_to_keep=1)
    cc.state.step = None
    return out.logits[:, -1].float()


def append(cc: CompressedCache, rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Append token ids (one list per row, left-padded into one chunk) at each row's next positions.

    Returns the logits of each row's last appended token [B, V]; advances `cc.next_pos`.
    """
    device = cc.next_pos.device
    q = max(len(r) for r in rows)
    if q == 0:
        return cc.first_logits
    ids = torch.full((len(rows), q), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), q), dtype=torch.long)
    valid = torch.zeros((len(rows), q), dtype=torch.bool)
    for b, r in enumerate(rows):
        pad = q - len(r)
        if r:
            ids[b, pad:] = torch.tensor(r)
            pos[b, pad:] = int(cc.next_pos[b]) + torch.arange(len(r))
            valid[b, pad:] = True
        pos[b, :pad] = int(cc.next_pos[b])  # masked anyway
    logits = _forward(cc, ids.to(device), pos.to(device), valid.to(device))
    cc.next_pos = cc.next_pos + torch.tensor([len(r) for r in rows], device=device)
    return logits


def greedy_decode(
    cc: CompressedCache, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int], *, compact: bool = False
) -> list[list[int]]:
    """Greedy decoding from `logits` [B, V]; token i of row b goes to position next_pos[b] + i.

    `compact=True` drops finished rows from the batch (and from `cc`, which is then not reusable) once a quarter
    of the active rows has finished, so that long answers of a few rows do not keep the whole batch computing.
    """
    n_rows = logits.shape[0]
    device = cc.next_pos.device
    out: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    active = list(range(n_rows))  # the output row of each cache row
    pos = cc.next_pos.clone()  # [A]
    reserve(cc.cache, max_new_tokens)  # room for every step now: no per-step copy of the cache
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)  # [A]
        for row, tok in zip(active, tokens.tolist()):
            if not done[row]:
                if tok in stop_ids:
                    done[row] = True
                else:
                    out[row].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        if compact:
            keep = [j for j, row in enumerate(active) if not done[row]]
            if len(keep) <= 3 * len(active) // 4:
                idx = torch.tensor(keep, device=device)
                _select_rows(cc, idx)
                reserve(cc.cache, max_new_tokens - step)
                tokens, pos, active = tokens[idx], pos[idx], [active[j] for j in keep]
        ones = torch.ones((len(active), 1), dtype=torch.bool, device=device)
        logits = _forward(cc, tokens[:, None], pos[:, None], ones)
        pos = pos + 1
    return out


def _select_rows(cc: CompressedCache, idx: torch.Tensor) -> None:
    """Keep only the batch rows `idx` [A] of a compressed cache."""
    cc.state.keep_rows(idx)
    cc.next_pos = cc.next_pos.index_select(0, idx.to(cc.next_pos.device))
    cc.first_logits = cc.first_logits.index_select(0, idx.to(cc.first_logits.device))
    cc.prompt_lengths = [cc.prompt_lengths[j] for j in idx.tolist()] if cc.prompt_lengths else []


def _as_rows(context: str | list[str], question: str | list[str]) -> tuple[list[str], list[str], bool]:
    single = isinstance(context, str)
    contexts = [context] if single else list(context)
    if isinstance(question, str):
        questions = [question] * len(contexts)
    else:
        questions = list(question)
    if len(questions) != len(contexts):
        raise DapqError(f"{len(contexts)} contexts but {len(questions)} questions: pass one question per context.")
    if not contexts:
        raise DapqError("No prompt given.")
    return contexts, questions, single


def generate(
    model: Any,
    tokenizer: Any,
    context: str | list[str],
    question: str | list[str],
    method: Method | str | None = None,
    *,
    mode: str = "query_aware",
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    answer_prefix: str = "",
    stop: list[str] | None = None,
) -> GenerationOutput:
    """Answer `question` about `context` with the KV cache compressed by `method` (default: FullKV).

    A list of contexts (and one question each) runs as a left-padded batch. `mode` is "query_aware" (compress the
    whole prompt, as in the paper) or "question_agnostic" (compress the context only, then append the question).
    Returns text, token ids and stats (prompt length, kept tokens per layer, KV bytes before/after, timings).
    """
    method = resolve_method(method)
    if mode not in MODES:
        raise DapqError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DapqError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    contexts, questions, single = _as_rows(context, question)
    parts = [
        build_prompt(tokenizer, c, q, chat_template=chat_template, answer_prefix=answer_prefix)
        for c, q in zip(contexts, questions)
    ]
    _check_length(model, max(len(c) + len(q) for c, q in parts) + method.n_pseudo + max_new_tokens)
    if mode == "query_aware":
        cc = compress(model, tokenizer, [c + q for c, q in parts], method)
        logits = cc.first_logits
    else:
        if any(not c for c, _ in parts):
            raise DapqError("question_agnostic mode needs a non-empty context to compress.")
        cc = compress(model, tokenizer, [c for c, _ in parts], method)
        logits = append(cc, [q for _, q in parts], int(tokenizer.pad_token_id or 0))
    start = time.perf_counter()
    tokens = greedy_decode(cc, logits, max_new_tokens, stop_token_ids(tokenizer, stop), compact=True)
    _sync(_device(model))
    stats = dict(cc.stats, mode=mode, decode_s=time.perf_counter() - start, new_tokens=[len(t) for t in tokens])
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationOutput(text=texts[0] if single else texts, token_ids=tokens, stats=stats)


def answer_many(
    model: Any,
    tokenizer: Any,
    context: str,
    questions: list[str],
    method: Method | str | None = None,
    *,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    answer_prefix: str = "",
    stop: list[str] | None = None,
) -> list[GenerationOutput]:
    """Question-agnostic serving: compress `context` once, answer every question against it.

    Each question is appended after the compressed context (positions L, L+1, ...), answered greedily, and the cache
    is restored to its compressed state before the next question.
    """
    method = resolve_method(method)
    if not questions:
        raise DapqError("answer_many needs at least one question.")
    parts = [
        build_prompt(tokenizer, context, q, chat_template=chat_template, answer_prefix=answer_prefix) for q in questions
    ]
    ctx_ids = parts[0][0]
    if not ctx_ids:
        raise DapqError("answer_many needs a non-empty context to compress.")
    _check_length(model, len(ctx_ids) + max(len(q) for _, q in parts) + method.n_pseudo + max_new_tokens)
    cc = compress(model, tokenizer, [ctx_ids], method)
    snap = snapshot(cc.cache, cc.state.tracks)
    base_pos = cc.next_pos.clone()
    stops = stop_token_ids(tokenizer, stop)
    outputs = []
    for _, q_ids in parts:
        start = time.perf_counter()
        logits = append(cc, [q_ids], int(tokenizer.pad_token_id or 0))
        tokens = greedy_decode(cc, logits, max_new_tokens, stops)
        stats = dict(
            cc.stats, mode="question_agnostic", decode_s=time.perf_counter() - start, new_tokens=[len(tokens[0])]
        )
        outputs.append(
            GenerationOutput(text=tokenizer.decode(tokens[0], skip_special_tokens=True), token_ids=tokens, stats=stats)
        )
        restore(cc.cache, cc.state.tracks, snap)
        cc.next_pos = base_pos.clone()
    return outputs


def _check_length(model: Any, needed: int) -> None:
    max_pos = _max_positions(model)
    if max_pos is not None and needed > max_pos:
        raise DapqError(
            f"Prompt + pseudo tokens + max_new_tokens need {needed} positions but the model supports {max_pos}. "
            "Shorten the context, lower max_new_tokens, or use a model with a longer context."
        )
