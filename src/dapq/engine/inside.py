"""Compression inside transformers' own `model.generate`: the `compressing` context manager.

    from dapq import compressing, get_method
    with compressing(model, get_method("snapkv", budget=128), tokenizer=tok):
        out = model.generate(ids, max_new_tokens=64, do_sample=True, temperature=0.7, streamer=streamer)

Inside the block the model's `forward` is routed through dapq (restored on exit; nothing is patched at import). The
first call of a generation (an empty cache, as `generate` makes one) becomes dapq's compressing prefill of each row's
prompt (`dapq.engine.prefill.compress`: pseudo suffixes, a staged method's lookahead and a context pass included),
and returns the prompt's last logits with the compressed cache. Every later call with that cache feeds its tokens
at each row's own next position: the next token of a prompt of L tokens goes to position L whatever was evicted,
and no prompt token is fed again. The cache reports its *logical* length (prompt + tokens fed since), which is what
`generate` derives how many input tokens are new from, so a returned cache can be passed back with the whole
conversation plus a new turn: only the new turn is fed, after the compressed cache (multi-turn use; a call whose
input_ids are longer than the logical length is taken as the whole sequence and only its new columns are fed).

`generate` itself does everything else unchanged: greedy, sampling (temperature, top-k/p, its seed), logits
processors, stopping criteria, streamers, left-padded batches, and beam search (the cache reorders with the engine's
per-row bookkeeping). Assisted or prompt-lookup decoding and `prefill_chunk_size` are refused with one line: they
feed several speculative tokens and roll the cache back, which an evicted cache cannot undo.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DapqError
from ..hf.attention import Step, activate
from ..methods.base import Method
from .decode import CompressedCache
from .decode_time import DecodeCompression, DecodeEvictor
from .prefill import compress
from .serve import method_for

#: the keywords dapq sets itself on a decoding step (the caller's values are replaced)
OURS = ("input_ids", "position_ids", "attention_mask", "cache_position", "past_key_values", "use_cache")
#: set while dapq itself runs the model (the compressing prefill, a lookahead, a draft): calls pass straight through
_OWN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("dapq_own_call", default=False)


class Session:
    """What one `compressing` block holds: the model's own forward, the method, and the compressed caches made in
    it (cache object -> CompressedCache), so a cache passed back later is recognised."""

    def __init__(self, model: Any, method: Method, tokenizer: Any, decode_compression: DecodeCompression | None = None):
        self.model = model
        self.method = method
        self.tokenizer = tokenizer
        self.decode_compression = decode_compression
        self.evictors: dict[int, DecodeEvictor] = {}
        self.own_forward = model.forward
        self.caches: dict[int, CompressedCache] = {}
        self.last: CompressedCache | None = None  # the latest compressed cache (stats for the caller)

    # ---------------------------------------------------------------------------------------------- dispatch
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if _OWN_CALL.get():
            return self.own_forward(*args, **kwargs)
        if args:  # generate passes keywords; a positional first argument is input_ids
            kwargs = {"input_ids": args[0], **kwargs} if len(args) == 1 else None  # type: ignore[assignment]
            if kwargs is None:
                raise DapqError("Inside dapq.compressing, call the model with keyword arguments (input_ids=...).")
        cache = kwargs.get("past_key_values")
        cc = self.caches.get(id(cache)) if cache is not None else None
        if cc is not None and cc.cache is cache:
            return self.step(cc, kwargs)
        if cache is None and not kwargs.get("use_cache", True):
            return self.own_forward(**kwargs)  # no cache at all: nothing to compress
        if cache is not None and cache.get_seq_length() > 0:
            raise DapqError(
                "Inside dapq.compressing, a past_key_values with content that dapq did not compress cannot be "
                "continued: start from an empty cache, or pass back the cache a compressed generation returned."
            )
        return self.prefill(kwargs)

    def prefill(self, kwargs: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        ids = kwargs.get("input_ids")
        if ids is None:
            raise DapqError("Inside dapq.compressing, pass input_ids (inputs_embeds cannot be compressed by dapq).")
        mask = kwargs.get("attention_mask")
        prompts = rows_of(ids, mask)
        token = _OWN_CALL.set(True)
        try:
            cc = compress(self.model, self.tokenizer, prompts, self.method)
        finally:
            _OWN_CALL.reset(token)
        self.caches[id(cc.cache)] = cc
        self.last = cc
        if self.decode_compression is not None:
            self.evictors[id(cc.cache)] = DecodeEvictor(cc.state, self.decode_compression)
        logical_length(cc)
        return CausalLMOutputWithPast(logits=cc.first_logits[:, None, :], past_key_values=cc.cache)

    def step(self, cc: CompressedCache, kwargs: dict[str, Any]) -> Any:
        """Tokens [B, q] after the compressed cache, at each row's next positions (prompt order kept per row)."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise DapqError("Inside dapq.compressing, decoding steps need input_ids.")
        b, q = ids.shape
        seen = int(cc.next_pos.max())
        if q > seen:  # the whole sequence so far plus the new tokens (generate without an attention mask)
            ids, q = ids[:, seen:], q - seen
        if b != cc.next_pos.shape[0]:
            raise DapqError(
                f"The compressed cache holds {cc.next_pos.shape[0]} rows but {b} were fed: pass back the cache of the "
                "same batch."
            )
        device = cc.next_pos.device
        pos = cc.next_pos[:, None] + torch.arange(q, device=device)[None, :]
        valid = torch.ones((b, q), dtype=torch.bool, device=device)
        passed = {k: v for k, v in kwargs.items() if k not in OURS}
        evictor = self.evictors.get(id(cc.cache))
        if evictor is not None and q > 1:  # a new turn: its queries re-score the cache once it is fed
            cc.state.start_capture()
        cc.state.set_step(Step(pos=pos, valid=valid))
        token = _OWN_CALL.set(True)
        try:
            with activate(list(cc.state.info.configs), cc.state), torch.inference_mode():
                out = self.own_forward(
                    input_ids=ids.to(device), position_ids=pos, past_key_values=cc.cache, use_cache=True, **passed
                )
        finally:
            _OWN_CALL.reset(token)
            cc.state.set_step(None)
        cc.next_pos = cc.next_pos + q
        if evictor is not None:
            if q > 1:
                self.evictors[id(cc.cache)] = DecodeEvictor(cc.state, evictor.dc)
            else:
                evictor.step()
        return out


def rows_of(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's prompt token ids: the columns its attention mask marks (left padding removed)."""
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise DapqError(f"input_ids must be [batch, tokens] with at least one token; got shape {tuple(ids.shape)}.")
    if mask is None:
        return [row.tolist() for row in ids]
    m = mask.bool()
    rows = []
    for r in range(ids.shape[0]):
        keep = m[r]
        n = int(keep.sum())
        if n == 0:
            raise DapqError(f"Row {r} of the batch has no token its attention mask keeps.")
        if not bool(keep[-n:].all()):
            raise DapqError(
                "dapq.compressing needs left padding (real tokens last in each row): set tokenizer.padding_side = "
                "'left' before tokenizing the batch."
            )
        rows.append(ids[r, -n:].tolist())
    return rows


def logical_length(cc: CompressedCache) -> None:
    """Make the compressed cache report the sequence length `generate` expects (prompt + tokens fed since, of the
    longest row) instead of the entries it keeps; and reorder/select the engine's per-row bookkeeping with it."""
    cache = cc.cache

    def get_seq_length(layer_idx: int = 0) -> int:
        return int(cc.next_pos.max())

    def reorder_cache(beam_idx: torch.Tensor) -> None:
        cc.select_rows(beam_idx.to(cc.next_pos.device))

    def crop(max_length: int) -> None:
        raise DapqError("A compressed cache cannot be rolled back (assisted or speculative decoding).")

    cache.get_seq_length = get_seq_length
    cache.reorder_cache = reorder_cache
    cache.batch_select_indices = reorder_cache
    cache.crop = crop


@contextlib.contextmanager
def compressing(
    model: Any,
    method: Method | str | None = None,
    *,
    tokenizer: Any,
    decode_compression: DecodeCompression | None = None,
    **params: Any,
) -> Iterator[Session]:
    """Within the block, `model.generate(...)` (and plain calls with a cache) compress the prompt with `method` (a
    Method, a registered name with `params`, or None for FullKV). `tokenizer` is the model's: methods read its pad,
    stop and special tokens. `decode_compression` also keeps the cache within the budget while generating
    (`dapq.engine.decode_time`). Yields the session; `session.last.stats` holds the latest compression's stats."""
    method = method_for(model, method, **params)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise DapqError("dapq.compressing needs the model's tokenizer: compressing(model, method, tokenizer=tok).")
    if isinstance(getattr(model.forward, "__self__", None), Session):
        raise DapqError("A dapq.compressing block is already open on this model: close it before opening another.")
    session = Session(model, method, tokenizer, decode_compression)
    own = vars(model).get("forward")  # an instance-level forward (accelerate's device_map hooks) is kept and restored
    model.forward = session.forward
    try:
        with refusing_rollbacks(model):
            yield session
    finally:
        if own is None:
            del model.forward  # back to the class's own forward
        else:
            model.forward = own
        session.caches.clear()


@contextlib.contextmanager
def refusing_rollbacks(model: Any) -> Iterator[None]:
    """Refuse, in one line, the generate modes that feed speculative tokens and roll the cache back."""
    own_generate = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        cfg = kwargs.get("generation_config")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "prefill_chunk_size"):
            if kwargs.get(name) is not None or (cfg is not None and getattr(cfg, name, None) is not None):
                raise DapqError(
                    f"{name} is not supported inside dapq.compressing: speculative decoding and chunked prefill roll "
                    "the cache back, which an evicted cache cannot undo."
                )
        return own_generate(*args, **kwargs)

    own = vars(model).get("generate")
    model.generate = generate
    try:
        yield
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own
