"""The RULER benchmark (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654; github.com/NVIDIA/RULER), generated offline at any target length.

All 11 synthetic tasks (S-NIAH-1/2/3, MK-NIAH-1/2/3, MV-NIAH, MQ-NIAH, VT, CWE, FWE) follow the public generation
scripts: the same templates, needle sentences, word lists (wonderwords), haystacks (noise sentences, Paul Graham
essays, distractor needles), sampled depths and answer prefixes. Each prompt is fitted with the evaluated model's
tokenizer and chat template so that prompt + answer prefix + tokens to generate <= the target length, as close to it
as the haystack's granularity allows. qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA dev distractor) are built from local
copies of the official files only.

    from dapq.tasks.ruler import RULER_TASKS, ruler_samples
    for task in RULER_TASKS:
        samples = ruler_samples(tokenizer, task, length=4096, n=50, seed=0)    # sample i uses seed + i
    qa = ruler_samples(tokenizer, "qa_1", 4096, 50, data_dir="~/data/ruler")  # needs squad.json there

From the command line: `dapq eval ruler --tasks all --lengths 2048,4096 --samples 50 --methods ... --budgets ...`
("all" is the 11 synthetic tasks; name qa_1/qa_2 explicitly, with --data-dir). Tests: tests/test_tasks.py.

Where the split into `Sample` parts differs from RULER's single prompt string: the instruction and haystack are the
context, the question is separate (the runner joins them with a blank line, RULER with one newline), and the answer
prefix follows the chat template's generation prompt.

Speed: haystack token counts are cached per unit (per essay word, noise line, distractor needle, word) and per
tokenizer, so a sample costs a few exact prompt measurements (`dapq.prompts.fit_units`), not a binary search over
re-tokenized haystacks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .registry import Family, Task, TaskArgs, lengths_of, parse_lengths, select_tasks
from .sample import Sample

RULER_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
QA_TASKS = ("qa_1", "qa_2")
ALL_TASKS = RULER_TASKS + QA_TASKS
PAPER_NAMES = {
    "niah_single_1": "S-NIAH-1",
    "niah_single_2": "S-NIAH-2",
    "niah_single_3": "S-NIAH-3",
    "niah_multikey_1": "MK-NIAH-1",
    "niah_multikey_2": "MK-NIAH-2",
    "niah_multikey_3": "MK-NIAH-3",
    "niah_multivalue": "MV-NIAH",
    "niah_multiquery": "MQ-NIAH",
    "vt": "VT",
    "cwe": "CWE",
    "fwe": "FWE",
    "qa_1": "QA-1",
    "qa_2": "QA-2",
}


# ---------------------------------------------------------------------------------------------------- public API
def ruler_samples(
    tokenizer: Any,
    task: str,
    length: int,
    n: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
    *,
    chat_template: bool | None = None,
) -> list[Sample]:
    """`n` samples of RULER task `task` (a name in RULER_TASKS or QA_TASKS) fitted to `length` tokens.

    Sample i is generated from seed + i (the same seed gives the same samples); its prompt (chat template, question
    and answer prefix included, measured with `dapq.prompts.build_prompt`) plus the task's tokens to generate is
    at most `length`. qa_1/qa_2 read SQuAD v2 dev / HotpotQA dev files from `data_dir` (question i is question
    seed + i of the file, with distractor documents drawn from seed + i).
    """
    if task not in ALL_TASKS:
        raise DapqError(f"Unknown RULER task {task!r}. Valid tasks: {', '.join(ALL_TASKS)}.")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise DapqError(f"length must be a positive integer; got {length!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DapqError(f"n must be an integer >= 0; got {n!r}")
    from .ruler_gen import NIAH_CONFIGS, TOKENS_TO_GENERATE, cwe_parts, fwe_parts, niah_parts, vt_parts
    from .ruler_qa import qa_parts

    samples = []
    for i in range(n):
        s = seed + i
        if task in NIAH_CONFIGS:
            parts, _, total = niah_parts(tokenizer, task, length, s, chat_template)
            kind = "niah"
        elif task == "vt":
            parts, _, total = vt_parts(tokenizer, length, s, chat_template)
            kind = "vt"
        elif task == "cwe":
            parts, _, total = cwe_parts(tokenizer, length, s, chat_template)
            kind = "cwe"
        elif task == "fwe":
            parts, _, total = fwe_parts(tokenizer, length, s, chat_template)
            kind = "fwe"
        else:
            parts, _, total = qa_parts(tokenizer, task, length, s, s, data_dir, chat_template)
            kind = "qa"
        samples.append(
            Sample(
                id=f"ruler-{task}-L{length}-s{s}",
                task=f"ruler/{task}",
                context=parts.context,
                question=parts.question,
                references=list(parts.references),
                metric="string_match_part" if kind == "qa" else "string_match_all",
                max_new_tokens=TOKENS_TO_GENERATE[kind],
                answer_prefix=parts.prefix,
                chat_template=chat_template,
                metadata={"length": length, "prompt_tokens": total, "seed": s, **parts.metadata},
            )
        )
    return samples


# ---------------------------------------------------------------------------------------------------- the family
DEFAULT_SAMPLES = 50


def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    n = args.n or DEFAULT_SAMPLES
    return [
        s
        for length in lengths_of(task, args)
        for s in ruler_samples(tokenizer, task.subtask or "", length, n, seed=args.seed, data_dir=args.data_dir)
    ]


def _tasks() -> list[Task]:
    metric = {t: "string_match_part" if t in QA_TASKS else "string_match_all" for t in ALL_TASKS}
    return [Task(f"ruler/{t}", "ruler", metric[t], True, _generate) for t in ALL_TASKS]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        default="all",
        help="all (the 11 synthetic tasks) or comma-separated names, e.g. niah_single_1,vt,cwe; qa_1, qa_2 need "
        "--data-dir",
    )
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths: a list (2048,4096 or 2k,4k) or a range")
    p.add_argument("--data-dir", default=None, help="folder with SQuAD/HotpotQA files for qa_1/qa_2")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    names = select_tasks("ruler", args.tasks)
    lengths = parse_lengths(args.lengths)
    return names, TaskArgs(lengths=lengths, n=args.samples, seed=args.seed, data_dir=args.data_dir)


FAMILY = Family(
    "ruler",
    _tasks,
    help="the RULER synthetic tasks, generated offline",
    add_options=_options,
    plan=_plan,
    # "all" is the 11 synthetic tasks: qa_1/qa_2 need data files, name them
    defaults=lambda: [f"ruler/{t}" for t in RULER_TASKS],
    word="RULER task",
    interleave=True,
    row_settings=("data_dir",),
)
