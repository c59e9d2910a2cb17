"""Prompts: the chat template's message around a context and a question, and the stop tokens of a tokenizer."""

from __future__ import annotations

from typing import Any

from .errors import DapqError

_QUESTION_MARK = "\x00DAPQ-QUESTION\x00"


def build_prompt(
    tokenizer: Any, context: str, question: str, *, chat_template: bool | None = None, answer_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part; concatenated they are the full prompt.

    With a chat template (default when the tokenizer has one), the user message is `context + "\\n\\n" + question`
    and the question part runs to the end of the generation prompt, followed by `answer_prefix`. The whole text is
    tokenized once, as the chat template tokenizes it (`split_encode`), so context + question ids are exactly the
    template's own prompt ids; the boundary between the parts is taken from the token offsets.
    """
    if not isinstance(context, str) or not isinstance(question, str):
        raise DapqError("context and question must be strings")
    if not context.strip() and not question.strip():
        raise DapqError("The prompt is empty: pass a non-empty context or question.")
    use_chat = tokenizer.chat_template is not None if chat_template is None else chat_template
    if use_chat:
        if tokenizer.chat_template is None:
            raise DapqError("This tokenizer has no chat template: pass chat_template=False (CLI: --no-chat-template).")
        messages = [{"role": "user", "content": f"{context}\n\n{_QUESTION_MARK}" if context else _QUESTION_MARK}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(_QUESTION_MARK)
        ctx_ids, q_ids = split_encode(tokenizer, before, question + after + answer_prefix, add_special_tokens=False)
    else:
        before = f"{context}\n\n" if context else ""
        ctx_ids, q_ids = split_encode(tokenizer, before, question + answer_prefix, add_special_tokens=True)
    return ctx_ids, q_ids


def split_encode(tokenizer: Any, head: str, tail: str, *, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Token ids of `head + tail` tokenized as one text, split into (the tokens inside `head`, the rest).

    Fast tokenizers give character offsets: a token belongs to the head part when it ends at or before the
    boundary (a token straddling it goes to the tail). Without offsets the head part is the longest common prefix
    of the whole text's ids and the head's own ids. Either way head + tail ids == tokenizer(head + tail)."""
    text = head + tail
    boundary = len(head)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        k = 0
        while k < len(ids) and offsets[k][1] <= boundary:  # added special tokens (BOS) have offsets (0, 0)
            k += 1
        return ids[:k], ids[k:]
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    head_ids = tokenizer.encode(head, add_special_tokens=add_special_tokens) if head else []
    k = 0
    while k < min(len(ids), len(head_ids)) and ids[k] == head_ids[k]:
        k += 1
    return ids[:k], ids[k:]


def stop_token_ids(tokenizer: Any, extra: list[str] | None = None) -> set[int]:
    """EOS plus the chat end-of-turn tokens the tokenizer knows, plus `extra` strings (single tokens)."""
    ids = set()
    for tok_id in [tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)]:
        if isinstance(tok_id, int):
            ids.add(tok_id)
    vocab = tokenizer.get_vocab()
    for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", *(extra or [])]:
        if name in vocab:
            ids.add(vocab[name])
    return ids
