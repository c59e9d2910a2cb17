"""The task registry: benchmark families, each a module that registers its tasks (name -> sample generator and
metric) and, when `dapq eval <family>` runs it, its own command-line options. `dapq eval`, `dapq ablate` and
`dapq analyze` build their samples here. Adding a benchmark is one module with a `FAMILY` (docs/adding-a-benchmark.md).

    from dapq.tasks import TaskArgs, get_task, task_samples
    get_task("ruler/vt")                       # Task(name="ruler/vt", family="ruler", metric="string_match_all", ...)
    samples = task_samples(tokenizer, "ruler/vt", TaskArgs(lengths=(2048, 4096), n=10))

Built-in families (a module each in `dapq.tasks`):

- `niah`: Kamradt's needle in a haystack, generated at each length; `n` is the number of depths, `prompt_style`
  kamradt (default) or kvcache-factory;
- `ruler/<task>`: the RULER tasks, generated at each length, `n` samples per length (default 50); qa_1 and qa_2
  read SQuAD / HotpotQA files from `data_dir`;
- `unseen/<kind>`: the unseen-kinds set (names, codes, dates, two-sentence facts in Python's bundled
  documentation), generated at each length, `n` samples per length (default 20);
- `longbench/<subset>`: LongBench v1 from `data_dir` (or the hub with `from_hub`), the first `n` records, prompts
  cut to `max_prompt_tokens`;
- `longbench-v2`: LongBench v2 from `data_file` (or `data_dir`/data.json);
- `helmet/<subset>`: HELMET from `data_dir`, at each HELMET input length (default 8192);
- `summary`: the analysis-only summarisation prompt, generated at each length, `n` prompts per length with seeds
  seed, seed + 1, ...; no metric and no `dapq eval` command.

Other families register with `register_family` (in-process) or through the `dapq.tasks` entry-point group of an
installed package (an entry point that loads to a `Family`). `get_task` (and `check_task`) raise a one-line
DapqError listing the valid names for an unknown one, and import no model code, so commands call them before loading
a model. Nothing in this package imports torch or the engine.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .sample import Sample

__all__ = [
    "Family",
    "Task",
    "TaskArgs",
    "check_task",
    "families",
    "forget_entry_points",
    "get_family",
    "get_task",
    "lengths_of",
    "parse_lengths",
    "register_family",
    "select_tasks",
    "task_names",
    "task_samples",
    "unregister_family",
]

#: the built-in families' modules, in the order error messages and `dapq eval --help` list them
BUILTIN = ("niah", "ruler", "unseen", "longbench", "longbench_v2", "helmet", "summary")
ENTRY_POINTS = "dapq.tasks"


@dataclass(frozen=True)
class TaskArgs:
    """What a sample generator may use; each task reads the fields that apply to it (see the module docstring).
    `options`: anything else a family's own command-line options carry (a family outside the package)."""

    lengths: Sequence[int] = ()  # prompt lengths in tokens (generated tasks); HELMET: its input lengths
    n: int | None = None  # samples per length (NIAH: depths); None: the task's default
    seed: int = 0
    data_dir: str | Path | None = None
    data_file: str | Path | None = None  # LongBench v2
    from_hub: bool = False  # LongBench v1, HELMET ICL/LongQA: load through `datasets`
    max_prompt_tokens: int | None = None  # loaded tasks: cut long contexts to this many prompt tokens
    prompt_style: str = "kamradt"  # NIAH: kamradt or kvcache-factory (`dapq.tasks.niah`)
    options: dict[str, Any] = field(default_factory=dict)


Generator = Callable[[Any, "Task", TaskArgs], list[Sample]]


@dataclass(frozen=True)
class Task:
    """One registered task: its name, family, metric (a name in `dapq.tasks.metrics.METRICS`; None for the
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


@dataclass(frozen=True)
class Family:
    """A benchmark family: its tasks and, for `dapq eval <name>`, its command-line options.

    `tasks` lists the family's tasks (called once, on first use). A family with `plan` is a `dapq eval` command:
    `add_options(parser)` adds its own options (the shared ones, such as --methods, --budgets, --samples, --seed,
    --model, exist already) and `plan(args)` turns the parsed command line into task names and TaskArgs, checking
    them without loading a model or reading data. `defaults`: the names "all" selects (default: every task);
    `word`: what a subtask is called in error messages ("RULER task"); `interleave`: `dapq eval` orders samples
    i of every (length, task) before sample i + 1, so a stopped run is balanced; `row_settings`: options that change
    rows without changing sample ids, recorded in run.json (a rerun into the folder must match them)."""

    name: str
    tasks: Callable[[], list[Task]]
    help: str = ""
    add_options: Callable[[argparse.ArgumentParser], None] | None = None
    plan: Callable[[argparse.Namespace], tuple[list[str], TaskArgs]] | None = None
    defaults: Callable[[], list[str]] | None = None
    word: str = ""
    interleave: bool = False
    row_settings: tuple[str, ...] = ()

    @property
    def evaluable(self) -> bool:
        """Whether `dapq eval <name>` runs it."""
        return self.plan is not None


_REGISTERED: dict[str, Family] = {}  # families registered in this process (register_family)


def register_family(family: Family) -> Family:
    """Register a family defined outside the package (returns it, so a module can write FAMILY =
    register_family(Family(...))). A name already taken by another family is a DapqError."""
    if not isinstance(family, Family):
        raise DapqError(f"register_family takes a dapq.tasks.Family; got {type(family).__name__}.")
    known = _families()
    if family.name in known and known[family.name] is not family:
        raise DapqError(f"A task family named {family.name!r} exists already: choose another name.")
    _REGISTERED[family.name] = family
    _registry.cache_clear()
    return family


def unregister_family(name: str) -> None:
    """Forget a family registered with `register_family` (built-in and entry-point families stay)."""
    if _REGISTERED.pop(name, None) is not None:
        _registry.cache_clear()


@functools.cache
def _builtin() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for module in BUILTIN:
        family = importlib.import_module(f"{__package__}.{module}").FAMILY
        out[family.name] = family
    return out


@functools.cache
def _entry_points() -> dict[str, Family]:
    from importlib.metadata import entry_points

    out: dict[str, Family] = {}
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            family = ep.load()
        except Exception as exc:  # a broken plug-in names itself, one line
            raise DapqError(f"The task family {ep.name!r} ({ep.value}) does not load: {exc}") from None
        if not isinstance(family, Family):
            raise DapqError(f"Entry point {ep.name!r} ({ep.value}) of {ENTRY_POINTS!r} is not a dapq.tasks.Family.")
        out[family.name] = family
    return out


def forget_entry_points() -> None:
    """Look the entry points up again on next use (after installing a plug-in in a running process)."""
    _entry_points.cache_clear()
    _registry.cache_clear()


def _families() -> dict[str, Family]:
    return {**_builtin(), **_entry_points(), **_REGISTERED}


def families(evaluable: bool = False) -> list[Family]:
    """Every family (built-in first), or only those `dapq eval` runs."""
    return [f for f in _families().values() if f.evaluable or not evaluable]


def get_family(name: str) -> Family:
    """The family `name`, or a one-line DapqError listing the valid ones."""
    known = _families()
    if name not in known:
        raise DapqError(f"Unknown task family {name!r}; valid: {', '.join(known)}.")
    return known[name]


@functools.cache
def _registry() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for family in _families().values():
        for task in family.tasks():
            if task.family != family.name:
                raise DapqError(f"Task {task.name!r} of family {family.name!r} names the family {task.family!r}.")
            tasks[task.name] = task
    return tasks


def lengths_of(task: Task, args: TaskArgs) -> list[int]:
    """The prompt lengths of a generated task, or a one-line DapqError when none were given."""
    if not args.lengths:
        raise DapqError(f"{task.name} is generated at a prompt length: pass lengths (e.g. 2048 or 2048,4096).")
    return list(args.lengths)


def parse_lengths(
    text: str, option: str = "--lengths", example: str = "1000-4000:500 or 2048,4096 or 1k,2k"
) -> list[int]:
    """Positive integers such as token counts: a range 'start-stop:step' (inclusive; step 500 when left out), or a
    comma list such as '2048,4096' or '1k,2k' (k = 1000). `example` goes into the error message."""

    def one(x: str) -> int:
        x = x.strip().lower()
        return int(float(x[:-1]) * 1000) if x.endswith("k") else int(x)

    try:
        if "-" in text:
            span, _, step = text.partition(":")
            lo, hi = (one(x) for x in span.split("-"))
            values = list(range(lo, hi + 1, one(step) if step else 500))
        else:
            values = [one(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise DapqError(f"{option} takes a range or a comma list, e.g. {example}; got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise DapqError(f"{option} needs positive integers, e.g. {example}; got {text!r}")
    return values


def task_names(family: str | None = None) -> list[str]:
    """Every registered name (of one family)."""
    return [n for n, t in _registry().items() if family is None or t.family == family]


def _valid_text(names: Sequence[str]) -> str:
    parts = []
    for family in _families():
        members = [n for n in names if _registry()[n].family == family]
        if not members:
            continue
        if members == [family]:
            parts.append(family)
        else:
            parts.append(f"{family}/<{', '.join(m.split('/', 1)[1] for m in members)}>")
    return "; ".join(parts)


def get_task(name: str, allowed: Sequence[str] | None = None, purpose: str = "") -> Task:
    """The registered task `name`; an unknown name (or one outside `allowed`, a list of names) is a one-line
    DapqError listing the valid names. `purpose` (e.g. "an ablation") is named in the message."""
    registry = _registry()
    valid = [n for n in registry if allowed is None or n in allowed]
    if name in valid:
        return registry[name]
    family, _, sub = name.partition("/")
    for_what = f" for {purpose}" if purpose else ""
    word = _families()[family].word if family in _families() else ""
    if sub and word and any(registry[n].family == family for n in valid):
        members = ", ".join(n.split("/", 1)[1] for n in valid if registry[n].family == family)
        raise DapqError(f"Unknown {word} {sub!r} in {name!r}{for_what}. Valid: {members}.")
    raise DapqError(f"Unknown task {name!r}{for_what}. Valid tasks: {_valid_text(valid)}.")


def check_task(name: str, allowed: Sequence[str] | None = None, purpose: str = "") -> None:
    """Fail fast, before any model load, on a task name `task_samples` does not know."""
    get_task(name, allowed, purpose)


def select_tasks(family: str, selection: str = "all") -> list[str]:
    """The task names of a comma list of subtask names of `family` (e.g. "ruler", "niah_single_1,vt"), or of its
    default set for "all"; each name checked (DapqError listing the valid ones)."""
    fam = get_family(family)
    if selection.strip() == "all":
        return fam.defaults() if fam.defaults is not None else task_names(family)
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
