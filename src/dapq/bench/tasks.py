"""The task registry: one name per task, mapped to its sample generator and its metric. `dapq eval`, `dapq ablate`
and `dapq analyze` all build their samples here.

    from dapq.bench.tasks import TaskArgs, get_task, task_samples
    get_task("ruler/vt")                       # Task(name="ruler/vt", family="ruler", metric="string_match_all", ...)
    samples = task_samples(tokenizer, "ruler/vt", TaskArgs(lengths=(2048, 4096), n=10))

Names:

- `niah`: Kamradt's needle in a haystack (`dapq.bench.niah`), generated at each length; `n` is the number of depths,
  `prompt_style` kamradt (default) or kvcache-factory;
- `ruler/<task>`: the RULER tasks (`dapq.bench.ruler`), generated at each length, `n` samples per length (default
  50); qa_1 and qa_2 read SQuAD / HotpotQA files from `data_dir`;
- `longbench/<subset>`: LongBench v1 (`dapq.bench.longbench`) from `data_dir` (or the hub with `from_hub`), the
  first `n` records, prompts cut to `max_prompt_tokens`;
- `longbench-v2`: LongBench v2 (`dapq.bench.longbench_v2`) from `data_file` (or `data_dir`/data.json);
- `helmet/<subset>`: HELMET (`dapq.bench.helmet`) from `data_dir`, at each HELMET input length (default 8192);
- `unseen/<kind>`: the unseen-kinds set (`dapq.bench.unseen`: names, codes, dates, two-sentence facts in Python's
  bundled documentation), generated at each length, `n` samples per length (default 20);
- `summary`: the analysis-only summarisation prompt (`dapq.bench.summary`), generated at each length, `n` prompts
  per length with seeds seed, seed + 1, ...; no metric.

`get_task` (and `check_task`) raise a one-line DapqError listing the valid names for an unknown one, and import no
model code, so commands call them before loading a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .base import Sample

__all__ = [
    "FAMILIES",
    "Task",
    "TaskArgs",
    "check_task",
    "get_task",
    "select_tasks",
    "task_names",
    "task_samples",
]

#: Families in the order the error messages list them. A family with subtasks is written `<family>/<name>`.
FAMILIES = ("niah", "ruler", "unseen", "longbench", "longbench-v2", "helmet", "summary")
DEFAULT_RULER_SAMPLES = 50
DEFAULT_NIAH_DEPTHS = 10
DEFAULT_HELMET_LENGTH = 8192
DEFAULT_UNSEEN_SAMPLES = 20


@dataclass(frozen=True)
class TaskArgs:
    """What a sample generator may use; each task reads the fields that apply to it (see the module docstring)."""

    lengths: Sequence[int] = ()  # prompt lengths in tokens (generated tasks); HELMET: its input lengths
    n: int | None = None  # samples per length (NIAH: depths); None: the task's default
    seed: int = 0
    data_dir: str | Path | None = None
    data_file: str | Path | None = None  # LongBench v2
    from_hub: bool = False  # LongBench v1, HELMET ICL/LongQA: load through `datasets`
    max_prompt_tokens: int | None = None  # loaded tasks: cut long contexts to this many prompt tokens
    prompt_style: str = "kamradt"  # NIAH: kamradt or kvcache-factory (`dapq.bench.niah`)


Generator = Callable[[Any, "Task", TaskArgs], list[Sample]]


@dataclass(frozen=True)
class Task:
    """One registered task: its name, family, metric (a name in `dapq.bench.metrics.METRICS`; None for the
    analysis-only summary prompt), whether it is generated offline at a prompt length (`generated`) or loaded from
    data files, and its sample generator."""

    name: str
    family: str
    metric: str | None
    generated: bool
    generator: Generator

    @property
    def subtask(self) -> str | None:
        """The part after `<family>/`, or None for a task without subtasks."""
        return self.name.split("/", 1)[1] if "/" in self.name else None

    def samples(self, tokenizer: Any, args: TaskArgs) -> list[Sample]:
        return self.generator(tokenizer, self, args)


# ---------------------------------------------------------------------------------------------------- generators
def _lengths(task: Task, args: TaskArgs) -> list[int]:
    if not args.lengths:
        raise DapqError(f"{task.name} is generated at a prompt length: pass lengths (e.g. 2048 or 2048,4096).")
    return list(args.lengths)


def _niah(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .niah import niah_samples

    depths = DEFAULT_NIAH_DEPTHS if args.n is None else args.n
    return niah_samples(tokenizer, _lengths(task, args), depths, seed=args.seed, prompt_style=args.prompt_style)


def _ruler(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .ruler import ruler_samples

    n = args.n or DEFAULT_RULER_SAMPLES
    return [
        s
        for length in _lengths(task, args)
        for s in ruler_samples(tokenizer, task.subtask, length, n, seed=args.seed, data_dir=args.data_dir)
    ]


def _unseen(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .unseen import unseen_samples

    n = args.n or DEFAULT_UNSEEN_SAMPLES
    return [s for length in _lengths(task, args) for s in unseen_samples(tokenizer, task.subtask, length, n, args.seed)]


def _longbench(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .longbench import longbench_samples

    return longbench_samples(
        tokenizer,
        task.subtask,
        data_dir=args.data_dir,
        from_hub=args.from_hub,
        max_prompt_tokens=args.max_prompt_tokens,
        n=args.n,
    )


def _longbench_v2(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .longbench_v2 import longbench_v2_samples

    data_file = args.data_file
    if data_file is None and args.data_dir is not None:
        data_file = Path(args.data_dir).expanduser() / "data.json"
    if data_file is None:
        raise DapqError("longbench-v2 reads THUDM/LongBench-v2's data.json: pass its path (CLI: --data-file).")
    return longbench_v2_samples(tokenizer, data_file, max_prompt_tokens=args.max_prompt_tokens, n=args.n)


def _helmet(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .helmet import helmet_samples

    return [
        s
        for length in list(args.lengths) or [DEFAULT_HELMET_LENGTH]
        for s in helmet_samples(
            tokenizer,
            task.subtask,
            args.data_dir,
            length=length,
            max_prompt_tokens=args.max_prompt_tokens,
            n=args.n,
            from_hub=args.from_hub,
        )
    ]


def _summary(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    from .summary import summary_sample

    n = 1 if args.n is None else args.n
    return [summary_sample(tokenizer, length, args.seed + i) for length in _lengths(task, args) for i in range(n)]


# ---------------------------------------------------------------------------------------------------- the registry
@functools.cache
def _registry() -> dict[str, Task]:
    from .helmet import HELMET_METRICS, HELMET_SUBSETS
    from .longbench import LONGBENCH_METRICS, LONGBENCH_SUBSETS
    from .niah import NIAH_METRIC
    from .ruler import ALL_TASKS, QA_TASKS
    from .unseen import METRIC as UNSEEN_METRIC
    from .unseen import UNSEEN_KINDS

    tasks = [Task("niah", "niah", NIAH_METRIC, True, _niah)]
    tasks += [
        Task(f"ruler/{t}", "ruler", "string_match_part" if t in QA_TASKS else "string_match_all", True, _ruler)
        for t in ALL_TASKS
    ]
    tasks += [Task(f"unseen/{k}", "unseen", UNSEEN_METRIC, True, _unseen) for k in UNSEEN_KINDS]
    tasks += [Task(f"longbench/{s}", "longbench", LONGBENCH_METRICS[s], False, _longbench) for s in LONGBENCH_SUBSETS]
    tasks.append(Task("longbench-v2", "longbench-v2", "longbench_v2_choice", False, _longbench_v2))
    tasks += [Task(f"helmet/{s}", "helmet", HELMET_METRICS[s], False, _helmet) for s in HELMET_SUBSETS]
    tasks.append(Task("summary", "summary", None, True, _summary))
    return {t.name: t for t in tasks}


def _family_defaults(family: str) -> list[str]:
    """What `all` means for a family: RULER's synthetic tasks (qa_1/qa_2 need data files: name them), every
    LongBench v1 English subset, every HELMET subset."""
    if family == "ruler":
        from .ruler import RULER_TASKS

        return [f"ruler/{t}" for t in RULER_TASKS]
    return [n for n, t in _registry().items() if t.family == family]


def task_names(family: str | None = None) -> list[str]:
    """Every registered name (of one family)."""
    return [n for n, t in _registry().items() if family is None or t.family == family]


def _valid_text(names: Sequence[str]) -> str:
    parts = []
    for family in FAMILIES:
        members = [n for n in names if _registry()[n].family == family]
        if not members:
            continue
        if members == [family]:
            parts.append(family)
        else:
            parts.append(f"{family}/<{', '.join(m.split('/', 1)[1] for m in members)}>")
    return "; ".join(parts)


_FAMILY_WORDS = {
    "ruler": "RULER task",
    "unseen": "unseen kind",
    "longbench": "LongBench subset",
    "helmet": "HELMET subset",
}


def get_task(name: str, allowed: Sequence[str] | None = None, purpose: str = "") -> Task:
    """The registered task `name`; an unknown name (or one outside `allowed`, a list of names) is a one-line
    DapqError listing the valid names. `purpose` (e.g. "an ablation") is named in the message."""
    registry = _registry()
    valid = [n for n in registry if allowed is None or n in allowed]
    if name in valid:
        return registry[name]
    family, _, sub = name.partition("/")
    for_what = f" for {purpose}" if purpose else ""
    if sub and family in _FAMILY_WORDS and any(registry[n].family == family for n in valid):
        members = ", ".join(n.split("/", 1)[1] for n in valid if registry[n].family == family)
        raise DapqError(f"Unknown {_FAMILY_WORDS[family]} {sub!r} in {name!r}{for_what}. Valid: {members}.")
    raise DapqError(f"Unknown task {name!r}{for_what}. Valid tasks: {_valid_text(valid)}.")


def check_task(name: str, allowed: Sequence[str] | None = None, purpose: str = "") -> None:
    """Fail fast, before any model load, on a task name `task_samples` does not know."""
    get_task(name, allowed, purpose)


def select_tasks(family: str, selection: str = "all") -> list[str]:
    """The task names of a comma list of subtask names of `family` (e.g. "ruler", "niah_single_1,vt"), or of its
    default set for "all"; each name checked (DapqError listing the valid ones)."""
    if family not in FAMILIES:
        raise DapqError(f"Unknown task family {family!r}; valid: {', '.join(FAMILIES)}.")
    if selection.strip() == "all":
        return _family_defaults(family)
    items = [x.strip() for x in selection.split(",") if x.strip()]
    if not items:
        raise DapqError(f"No {family} tasks selected: pass 'all' or comma-separated names.")
    names = [x if x.startswith(f"{family}/") else f"{family}/{x}" for x in items]
    for name in names:
        check_task(name, task_names(family))
    return names


def task_samples(tokenizer: Any, name: str, args: TaskArgs | None = None) -> list[Sample]:
    """The samples of task `name` (see the module docstring for what each task reads from `args`)."""
    return get_task(name).samples(tokenizer, args or TaskArgs())
