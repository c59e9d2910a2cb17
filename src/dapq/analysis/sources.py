"""Prompts for the analysis suite: the bundled essays with a summarisation request (the offline stand-in for the
paper's GovReport example), or any harness task (NIAH, RULER, LongBench with local files).

    prompts = analysis_prompts(tokenizer, "summary", length=4096, n=4)      # [(id, prompt token ids), ...]
"""

from __future__ import annotations

from typing import Any

from ..data import haystack_text
from ..errors import DapqError
from ..prompts import build_prompt

SUMMARY_QUESTION = "Summarize the essays above in a few paragraphs."
TASK_HELP = "summary, niah, ruler/<task> (e.g. ruler/niah_single_1) or longbench/<subset> (with --data-dir)"


def summary_prompt(tokenizer: Any, length: int, seed: int = 0) -> list[int]:
    """Essays (starting at a seeded offset) cut so that the whole prompt, request included, has <= `length` tokens."""
    key = "_dapq_essay_ids"
    ids = getattr(tokenizer, key, None)
    if ids is None:
        ids = tokenizer.encode(haystack_text(), add_special_tokens=False)
        try:
            setattr(tokenizer, key, ids)
        except AttributeError:
            pass
    start = (seed * 7919) % max(1, len(ids) - length) if seed else 0
    hay = ids[start:] + ids[:start]
    n = length
    for _ in range(8):  # decoding and re-encoding can shift the count by a few tokens: shrink until it fits
        ctx, q = build_prompt(tokenizer, tokenizer.decode(hay[:n]), SUMMARY_QUESTION)
        over = len(ctx) + len(q) - length
        if over <= 0:
            return ctx + q
        n -= over
    raise DapqError(f"Could not fit a summary prompt into {length} tokens; try a larger length.")


def analysis_prompts(
    tokenizer: Any, task: str, length: int, n: int, seed: int = 0, data_dir: str | None = None
) -> list[tuple[str, list[int]]]:
    """`n` prompts (id, token ids) of about `length` tokens from `task` (see TASK_HELP)."""
    if not isinstance(n, int) or n < 1:
        raise DapqError(f"--samples must be an integer >= 1; got {n!r}")
    if not isinstance(length, int) or length < 64:
        raise DapqError(f"--length must be an integer >= 64 tokens; got {length!r}")
    if task == "summary":
        return [(f"summary-L{length}-s{seed + i}", summary_prompt(tokenizer, length, seed + i)) for i in range(n)]
    if task == "niah":
        from ..bench.niah import niah_samples

        samples = niah_samples(tokenizer, [length], n, seed=seed)
    elif task.startswith("ruler/"):
        from ..bench.ruler import ruler_samples

        samples = ruler_samples(tokenizer, task.split("/", 1)[1], length, n, seed=seed, data_dir=data_dir)
    elif task.startswith("longbench/"):
        from ..bench.longbench import longbench_samples

        samples = longbench_samples(tokenizer, task.split("/", 1)[1], data_dir=data_dir, max_prompt_tokens=length, n=n)
    else:
        raise DapqError(f"Unknown analysis task {task!r}. Use {TASK_HELP}.")
    out = []
    for s in samples:
        ctx, q = s.prompt_ids(tokenizer)
        out.append((s.id, ctx + q))
    return out
