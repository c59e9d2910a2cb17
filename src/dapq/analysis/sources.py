"""Prompts for the analysis suite, from the task registry (`dapq.tasks`): the bundled essays with a
summarisation request (`summary`, the offline stand-in for the paper's GovReport example), or any harness task
(niah, ruler/<task>, longbench/<subset> with local files, ...).

    prompts = analysis_prompts(tokenizer, "summary", length=4096, n=4)      # [(id, prompt token ids), ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..tasks import TaskArgs, check_task, task_samples

TASK_HELP = "summary, niah, ruler/<task> (e.g. ruler/niah_single_1) or longbench/<subset> (with --data-dir)"


def analysis_prompts(
    tokenizer: Any, task: str, length: int, n: int, seed: int = 0, data_dir: str | Path | None = None
) -> list[tuple[str, list[int]]]:
    """`n` prompts (id, token ids) of about `length` tokens from `task` (a registry name, see TASK_HELP).

    Generated tasks are built at `length` tokens; loaded ones (LongBench, HELMET) are cut to `length` prompt tokens."""
    if not isinstance(n, int) or n < 1:
        raise DapqError(f"--samples must be an integer >= 1; got {n!r}")
    if not isinstance(length, int) or length < 64:
        raise DapqError(f"--length must be an integer >= 64 tokens; got {length!r}")
    check_task(task)
    args = TaskArgs(lengths=(length,), n=n, seed=seed, data_dir=data_dir, max_prompt_tokens=length)
    out = []
    for s in task_samples(tokenizer, task, args):
        ctx, q = s.prompt_ids(tokenizer)
        out.append((s.id, ctx + q))
    return out
