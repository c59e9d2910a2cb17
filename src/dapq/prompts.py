"""Prompts in one place: chat-template prompts split into a context part and a question part, stop tokens, exact
prompt lengths, and fitting a prompt to a token budget.

    from dapq.prompts import build_prompt, prompt_tokens, stop_token_ids
    ctx_ids, q_ids = build_prompt(tokenizer, context, question)   # ctx_ids + q_ids is the prompt the model sees
    prompt_tokens(tokenizer, context, question)                    # == len(ctx_ids) + len(q_ids)

The fitting helpers are what the benchmark tasks (`dapq.bench`) use to hit a target length with the evaluated
model's own tokenizer and chat template:

- `fit_units` finds the largest haystack size (in task-defined units: tokens, lines, words) whose exact prompt fits a
  token limit, from a cheap estimate plus a few exact measurements (NIAH, RULER);
- `fit_prompt` cuts a long document (keeping head and tail, or the head) until the whole prompt fits (LongBench v1/v2,
  HELMET);
- `split_at_junction` splits an official one-string prompt into (context, question) so that `build_prompt`'s join
  reproduces it;
- `tokenizer_cache` is a dict that lives as long as a tokenizer, for token counts worth keeping across samples.

Nothing here imports torch or transformers: a tokenizer is anything with `encode`, `decode`, `chat_template`,
`apply_chat_template` and `get_vocab` (the Hugging Face tokenizer interface).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .errors import DapqError

__all__ = [
    "MODES",
    "PromptSample",
    "build_prompt",
    "chat_template_parts",
    "fit_prompt",
    "fit_units",
    "prompt_tokens",
    "sample_prompt_tokens",
    "split_at_junction",
    "split_encode",
    "stop_token_ids",
    "tokenizer_cache",
]

#: how a prompt is compressed: the whole of it (query_aware, as the DapQ paper) or its context only, the question
#: appended after the compressed context (question_agnostic); the one definition the engine and the CLI share
MODES = ("query_aware", "question_agnostic")

_QUESTION_MARK = "\x00DAPQ-QUESTION\x00"
_CHAT_STOPS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class PromptSample(Protocol):
    """What the fitting helpers read and write on a sample (`dapq.tasks.sample.Sample` has all of it)."""

    id: str
    task: str
    context: str
    question: str
    answer_prefix: str
    chat_template: bool | None
    separator: str
    metadata: dict[str, Any]


S = TypeVar("S", bound=PromptSample)


# ---------------------------------------------------------------------------------------------------- prompts
def build_prompt(
    tokenizer: Any,
    context: str,
    question: str,
    *,
    chat_template: bool | None = None,
    answer_prefix: str = "",
    separator: str = "\n\n",
) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part; concatenated they are the full prompt.

    With a chat template (default when the tokenizer has one), the user message is `context + separator + question`
    (separator "\\n\\n" unless given) and the question part runs to the end of the generation prompt, followed by
    `answer_prefix`; without one the text is `context + separator + question + answer_prefix`. The whole text is
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
        messages = [{"role": "user", "content": f"{context}{separator}{_QUESTION_MARK}" if context else _QUESTION_MARK}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(_QUESTION_MARK)
        ctx_ids, q_ids = split_encode(tokenizer, before, question + after + answer_prefix, add_special_tokens=False)
    else:
        before = f"{context}{separator}" if context else ""
        ctx_ids, q_ids = split_encode(tokenizer, before, question + answer_prefix, add_special_tokens=True)
    return ctx_ids, q_ids


def chat_template_parts(tokenizer: Any) -> tuple[int, list[int]]:
    """(tokens the chat template puts before a user message's text, ids of what it puts after the text up to the
    assistant's turn), measured with a dummy message as kvpress's KVzipPress does; (0, ids of "\\n") without a
    chat template. KVzip's reconstruction prompt skips the first and closes the user turn with the second."""
    memo = tokenizer_cache(tokenizer)
    if "chat_template_parts" not in memo:
        if getattr(tokenizer, "chat_template", None) is None:
            memo["chat_template_parts"] = (0, list(tokenizer.encode("\n", add_special_tokens=False)))
        else:
            dummy, sep = "dummy context", "\n" + "#" * len("dummy context")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": dummy + sep}], add_generation_prompt=True, tokenize=False
            )
            head, tail = text.split(sep)
            prefix = head.split(dummy)[0]
            memo["chat_template_parts"] = (
                len(tokenizer.encode(prefix, add_special_tokens=False)),
                list(tokenizer.encode(tail, add_special_tokens=False)),
            )
    return memo["chat_template_parts"]


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
    for name in [*_CHAT_STOPS, *(extra or [])]:
        if name in vocab:
            ids.add(vocab[name])
    return ids


def prompt_tokens(
    tokenizer: Any,
    context: str,
    question: str,
    answer_prefix: str = "",
    chat_template: bool | None = None,
    separator: str = "\n\n",
) -> int:
    """The exact number of prompt tokens a model sees: len(context part) + len(question part) of `build_prompt`."""
    ctx, q = build_prompt(
        tokenizer, context, question, chat_template=chat_template, answer_prefix=answer_prefix, separator=separator
    )
    return len(ctx) + len(q)


def sample_prompt_tokens(tokenizer: Any, sample: PromptSample) -> int:
    """`prompt_tokens` of a sample (its chat-template choice, separator and answer prefix included)."""
    return prompt_tokens(
        tokenizer, sample.context, sample.question, sample.answer_prefix, sample.chat_template, sample.separator
    )


# ---------------------------------------------------------------------------------------------------- caching
_CACHES: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
_STRONG: dict[int, tuple[Any, dict[Any, Any]]] = {}


def tokenizer_cache(tokenizer: Any) -> dict[Any, Any]:
    """A dict that lives as long as `tokenizer`, for token counts that are expensive to recompute."""
    try:
        return _CACHES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: keep it alive with its cache
        entry = _STRONG.setdefault(id(tokenizer), (tokenizer, {}))
        return entry[1]


# ---------------------------------------------------------------------------------------------------- fitting
def _largest_within(est: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with est(n) <= target (est non-decreasing); lo when none.

    Gallops up from lo before bisecting, so a lazily counted `est` is only evaluated near the answer."""
    if est(lo) > target:
        return lo
    step = 1
    while lo + step <= hi and est(lo + step) <= target:
        lo, step = lo + step, step * 2
    hi = min(hi, lo + step - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_units(
    measure: Callable[[int], int], est: Callable[[int], float], limit: int, n_min: int, n_max: int, what: str
) -> tuple[int, int]:
    """Largest haystack size n in [n_min, n_max] whose exact prompt length `measure(n)` is <= `limit`.

    `est(n)` is a cheap, non-decreasing estimate of the tokens that n haystack units add (from token counts cached per
    unit); the difference between `measure` and `est` at the last candidate corrects the next guess (a secant step on a
    binary-search bracket), so a sample costs a few exact measurements instead of a full binary search over
    re-tokenized haystacks. Stops when one more unit would not fit. Returns (n, measure(n)).
    """
    seen: dict[int, int] = {}

    def m(n: int) -> int:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n]

    if m(n_min) > limit:
        raise DapqError(
            f"The target length is too short for {what}: even the smallest prompt has {seen[n_min]} tokens, more "
            f"than the {limit} available. Use a longer length."
        )
    lo, hi = n_min, n_max + 1  # lo fits; hi is the smallest size known not to fit (n_max + 1: none known)
    n = lo
    for _ in range(64):
        t = m(n)
        if t <= limit:
            lo = max(lo, n)
            if n == lo and (n >= n_max or limit - t < est(n + 1) - est(n)):
                break  # the next unit would not fit
        else:
            hi = min(hi, n)
        if hi - lo <= 1:
            break
        guess = _largest_within(est, limit - (m(lo) - est(lo)), lo, hi - 1)
        if guess <= lo:
            guess = lo + 1
        if guess in seen:  # the secant step stalls: bisect the bracket
            guess = (lo + hi) // 2
        n = min(guess, hi - 1)
    return lo, seen[lo]


def split_at_junction(head: str, tail: str, sep: str = "\n\n") -> tuple[str, str]:
    """Split `head + tail` into (context, question) so that `context + sep + question` reproduces it.

    `build_prompt` puts "\\n\\n" between the context part and the question part. The newlines found at the
    junction (trailing ones of `head`, leading ones of `tail`) are consumed for it, from `tail` first. When there are
    fewer than two, they are all removed and the joined prompt has extra newlines there.
    """
    n_sep = len(sep)
    lead = len(tail) - len(tail.lstrip("\n"))
    trail = len(head) - len(head.rstrip("\n"))
    from_tail = min(lead, n_sep)
    from_head = min(trail, n_sep - from_tail)
    return head[: len(head) - from_head], tail[from_tail:]


def fit_prompt(
    tokenizer: Any,
    make: Callable[[str], S],
    document: str,
    max_prompt_tokens: int,
    *,
    keep: str = "middle",
    marker: str = "",
) -> S:
    """Build `make(document)`, cutting `document` by tokens so the whole prompt fits `max_prompt_tokens`.

    keep="middle" (LongBench v1/v2 pred.py): keep the document's head and tail; the cut sits where the official cut
    of the whole prompt at its token midpoint would fall (prompt[:M//2] + prompt[-M//2:]), so the head gets
    M//2 - (tokens before the document) and the tail the rest. Head and tail are decoded separately and concatenated,
    as pred.py does. keep="head" (HELMET): keep the beginning and drop the end, then append `marker`.
    The question part is never cut; the prompt is re-measured after decoding and the cut is widened until it fits.
    Adds metadata `prompt_tokens`, `truncated` and `document_tokens` (before the cut).
    """
    if max_prompt_tokens <= 0:
        raise DapqError(f"max_prompt_tokens must be positive; got {max_prompt_tokens}.")
    sample = make(document)
    total = sample_prompt_tokens(tokenizer, sample)
    doc_ids = list(tokenizer.encode(document, add_special_tokens=False))
    sample.metadata.update(prompt_tokens=total, truncated=False, document_tokens=len(doc_ids))
    if total <= max_prompt_tokens:
        return sample
    bare = make("")
    n_before = len(build_prompt(tokenizer, bare.context or " ", "", chat_template=bare.chat_template)[0])
    n_keep = len(doc_ids) - (total - max_prompt_tokens)
    for _ in range(32):
        if n_keep <= 0:
            break
        if keep == "middle":
            n_head = min(max(max_prompt_tokens // 2 - n_before, 0), n_keep)
            n_tail = n_keep - n_head
            text = tokenizer.decode(doc_ids[:n_head], skip_special_tokens=True)
            if n_tail:
                text += tokenizer.decode(doc_ids[len(doc_ids) - n_tail :], skip_special_tokens=True)
        elif keep == "head":
            text = tokenizer.decode(doc_ids[:n_keep], skip_special_tokens=True) + marker
        else:
            raise DapqError(f"keep must be 'middle' or 'head'; got {keep!r}")
        sample = make(text)
        total = sample_prompt_tokens(tokenizer, sample)
        if total <= max_prompt_tokens:
            sample.metadata.update(prompt_tokens=total, truncated=True, document_tokens=len(doc_ids))
            return sample
        n_keep -= max(total - max_prompt_tokens, 1)
    raise DapqError(
        f"Sample {sample.id} of {sample.task} does not fit max_prompt_tokens={max_prompt_tokens} even with its long "
        "context cut away (the instruction and question alone are too long): raise max_prompt_tokens."
    )
