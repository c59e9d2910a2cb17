"""A conversation over one compressed document: the document is compressed once, then every turn is appended after
it and stays in the cache (only the document is ever evicted).

    from dapq import Chat, get_method
    chat = Chat(model, tok, document, get_method("snapkv", budget=128))
    print(chat.ask("Who signed the report?").text)
    print(chat.ask("And when?").text)          # the first question and answer are still in the cache
    chat.stats()                               # KV kept for the document and the conversation, bytes saved

The first turn is exactly `answer_many(model, tok, document, [question])` (the same prompt split, compression and
decoding). A later turn feeds what the chat template puts between the previous answer and the new question's
generation prompt (end of turn, the user's header, the question, the assistant's header), rendered from the whole
conversation, at the positions after everything fed so far.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import DapqError
from ..hf.cache import kv_bytes
from ..methods.base import Method
from ..methods.protocols import pseudo_length
from ..prompts import build_prompt, stop_token_ids
from .decode import Sampling, append, greedy_decode
from .decode_time import DecodeCompression
from .model_info import model_info
from .prefill import compress
from .serve import GenerationOutput, check_questions, method_for

_ANSWER_MARK = "\x00DAPQ-ANSWER\x00"
_PLACEHOLDER = "?"


class Chat:
    """Turn after turn about one document compressed once with `method` (default FullKV)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        document: str,
        method: Method | str | None = None,
        *,
        chat_template: bool | None = None,
        separator: str = "\n\n",
        stop: list[str] | None = None,
        **params: Any,
    ):
        if not isinstance(document, str) or not document.strip():
            raise DapqError("The document is empty: pass the text to talk about.")
        self.model, self.tokenizer = model, tokenizer
        self.method = method_for(model, method, **params)
        self.document, self.separator = document, separator
        self.use_chat = tokenizer.chat_template is not None if chat_template is None else chat_template
        self.stops = stop_token_ids(tokenizer, stop)
        self.ctx_ids, _ = build_prompt(
            tokenizer, document, _PLACEHOLDER, chat_template=self.use_chat, separator=separator
        )
        if not self.ctx_ids:
            raise DapqError("The document gave no tokens to compress.")
        self.max_positions = model_info(model).max_positions
        self.check_room(len(self.ctx_ids) + pseudo_length(self.method) + 1)
        self.cc = compress(model, tokenizer, [self.ctx_ids], self.method)
        self.compressed_bytes = kv_bytes(self.cc.cache)
        self.turns: list[tuple[str, str]] = []  # (question, answer) so far
        self.unfed: list[int] = []  # the last answer token(s) generated but not yet fed to the model

    # ------------------------------------------------------------------------------------------------ turns
    def turn_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        """The tokens to feed for `question` (and the text the answer starts with) after everything fed so far."""
        if not self.turns:
            ctx_ids, q_ids = build_prompt(
                self.tokenizer,
                self.document,
                question,
                chat_template=self.use_chat,
                separator=self.separator,
                answer_prefix=answer_prefix,
            )
            if ctx_ids != self.ctx_ids:  # the question changed how the document's last token is cut: never silent
                raise DapqError("This question changes the tokens of the document's end: start it with a space.")
            return q_ids
        if not self.use_chat:
            return list(self.tokenizer.encode(f"{self.separator}{question}{answer_prefix}", add_special_tokens=False))
        messages: list[dict[str, str]] = []
        for k, (q, a) in enumerate(self.turns):
            content = f"{self.document}{self.separator}{q}" if k == 0 else q
            answer = _ANSWER_MARK if k == len(self.turns) - 1 else a
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": question})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_ANSWER_MARK) != 1:
            raise DapqError("This tokenizer's chat template drops earlier answers: multi-turn chat is not possible.")
        return list(self.tokenizer.encode(text.split(_ANSWER_MARK)[1] + answer_prefix, add_special_tokens=False))

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 256,
        sampling: Sampling | None = None,
        streamer: Any = None,
        decode_compression: DecodeCompression | None = None,
        ignore_stops: bool = False,
        answer_prefix: str = "",
    ) -> GenerationOutput:
        """Answer `question`; the question and the answer stay in the cache for the next turn.
        `decode_compression` keeps the cache within the method's budget while answering (the conversation is then
        evicted too); `ignore_stops` writes all `max_new_tokens` (for measuring long outputs); `answer_prefix` is
        the text the answer starts with (fed after the assistant's header, as `generate` does)."""
        check_questions([question])
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DapqError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
        ids = self.unfed + self.turn_ids(question, answer_prefix)
        self.check_room(int(self.cc.next_pos[0]) + len(ids) + max_new_tokens)
        start = time.perf_counter()
        if decode_compression is not None:  # the turn's queries re-score the cache before decoding starts
            self.cc.state.start_capture()
        logits = append(self.cc, [ids], int(self.tokenizer.pad_token_id or 0))
        report: dict[str, Any] = {}
        stops = set() if ignore_stops else self.stops
        tokens = greedy_decode(
            self.cc,
            logits,
            max_new_tokens,
            stops,
            sampling=sampling,
            streamer=streamer,
            decode_compression=decode_compression,
            report=report,
        )[0]
        # every answer token but the last was fed; a stop token ends the turn and is never fed (the template's end
        # of turn is part of the next turn's ids)
        fed = len(tokens) - 1 if len(tokens) == max_new_tokens else len(tokens)
        self.cc.next_pos = self.cc.next_pos + fed
        self.unfed = tokens[fed:]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        self.turns.append((question, text))
        stats = dict(self.stats(), decode_s=time.perf_counter() - start, new_tokens=[len(tokens)], **report)
        return GenerationOutput(text=text, token_ids=[tokens], stats=stats)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """KV bytes now, the document's share (uncompressed vs kept) and tokens per part."""
        s = self.cc.stats
        now = kv_bytes(self.cc.cache)
        conversation_tokens = int(self.cc.next_pos[0]) - len(self.ctx_ids)
        per_token = s["kv_bytes_full"] / max(1, len(self.ctx_ids))
        full_now = s["kv_bytes_full"] + per_token * conversation_tokens
        return {
            "method": s["method"],
            "document_tokens": len(self.ctx_ids),
            "document_kept_mean": s["kept_mean"],
            "conversation_tokens": conversation_tokens,
            "kv_bytes": now,
            "kv_bytes_uncompressed": int(full_now),
            "saved": 1 - now / full_now if full_now else 0.0,
            "prefill_s": s["prefill_s"],
        }

    def check_room(self, needed: int) -> None:
        if self.max_positions is not None and needed > self.max_positions:
            raise DapqError(
                f"The conversation needs {needed} positions but the model supports {self.max_positions}: start a "
                "new chat or lower max_new_tokens."
            )
