"""The analysis suite's summarisation prompt: the bundled Paul Graham essays with a request to summarise them (the
offline stand-in for the paper's GovReport example). It has no references and no metric: `dapq analyze` uses it for
the model's own answer, `dapq bench` for prompts of a given length.

    from dapq.tasks.summary import summary_sample, summary_prompt
    sample = summary_sample(tokenizer, length=4096, seed=0)    # a Sample, prompt <= 4096 tokens
    ids = summary_prompt(tokenizer, 4096)                      # its prompt token ids (context + question part)
"""

from __future__ import annotations

from typing import Any

from ..data import haystack_text
from ..errors import DapqError
from ..prompts import prompt_tokens, tokenizer_cache
from .registry import Family, Task, TaskArgs, lengths_of
from .sample import Sample

SUMMARY_QUESTION = "Summarize the essays above in a few paragraphs."
SUMMARY_MAX_NEW_TOKENS = 512


def _essay_ids(tokenizer: Any) -> list[int]:
    cache = tokenizer_cache(tokenizer)
    if "summary_essay_ids" not in cache:
        cache["summary_essay_ids"] = tokenizer.encode(haystack_text(), add_special_tokens=False)
    return cache["summary_essay_ids"]


def summary_sample(tokenizer: Any, length: int, seed: int = 0) -> Sample:
    """Essays (starting at a seeded offset) cut so that the whole prompt, request included, has <= `length` tokens.

    Id `summary-L<length>-s<seed>`; metadata: length, prompt_tokens, seed. No references (metric ""): not scored."""
    ids = _essay_ids(tokenizer)
    start = (seed * 7919) % max(1, len(ids) - length) if seed else 0
    hay = ids[start:] + ids[:start]
    n = length
    for _ in range(8):  # decoding and re-encoding can shift the count by a few tokens: shrink until it fits
        context = tokenizer.decode(hay[:n])
        total = prompt_tokens(tokenizer, context, SUMMARY_QUESTION)
        over = total - length
        if over <= 0:
            return Sample(
                id=f"summary-L{length}-s{seed}",
                task="summary",
                context=context,
                question=SUMMARY_QUESTION,
                references=[],
                metric="",
                max_new_tokens=SUMMARY_MAX_NEW_TOKENS,
                metadata={"length": length, "prompt_tokens": total, "seed": seed},
            )
        n -= over
    raise DapqError(f"Could not fit a summary prompt into {length} tokens; try a larger length.")


def summary_prompt(tokenizer: Any, length: int, seed: int = 0) -> list[int]:
    """The prompt token ids (context part + question part) of `summary_sample(tokenizer, length, seed)`."""
    ctx, q = summary_sample(tokenizer, length, seed).prompt_ids(tokenizer)
    return ctx + q


# ---------------------------------------------------------------------------------------------------- the family
def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    n = 1 if args.n is None else args.n
    return [summary_sample(tokenizer, length, args.seed + i) for length in lengths_of(task, args) for i in range(n)]


#: analysis-only (no metric): no `dapq eval` command
FAMILY = Family("summary", lambda: [Task("summary", "summary", None, True, _generate)])
