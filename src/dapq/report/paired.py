"""Paired comparisons of two methods on the prompts both scored (`dapq report RUN --paired A,B`).

A table's AVG is the mean over tasks of each task's mean score, so the difference of two methods' AVGs is the
mean over tasks of the per-task mean of the per-sample differences (method A's score on a prompt minus method B's
on the same prompt). Its uncertainty comes from which prompts were drawn: a task-stratified paired bootstrap
resamples each task's prompts with replacement (the same draw for both methods, since they are paired) and
recomputes the difference; the 2.5th and 97.5th percentiles of `n_boot` such differences are the 95% interval,
and the share of draws with a difference <= 0 says how often the prompts could have made A no better than B.
Wins, losses and ties count the prompts where A scored above, below or equal to B. (Efron & Tibshirani, An
Introduction to the Bootstrap, 1993, ch. 13 for the percentile interval.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..errors import DapqError

DEFAULT_BOOT = 10_000


@dataclass(frozen=True)
class Paired:
    """Method `a` against method `b` at one budget (None: a budgetless method such as FullKV on that side)."""

    a: str
    b: str
    budget: Any
    tasks: int  # tasks with at least one prompt both methods scored
    samples: int  # prompts both scored, over those tasks
    diff: float  # AVG(a) - AVG(b) on those prompts, in score points
    low: float  # 95% paired-bootstrap interval of `diff`
    high: float
    p_not_better: float  # share of bootstrap draws with diff <= 0
    wins: int  # prompts where a scored above b
    losses: int
    ties: int


def parse_pair(text: str, methods: list[str]) -> tuple[str, str]:
    """'A,B' -> (A, B), both method keys of the rows; a one-line error that lists them otherwise.

    A key may hold commas itself (a method with parameters: `speckv,draft=self`), so the text is split at the one
    comma that leaves two keys of the rows on either side."""
    text = str(text)
    cuts = [i for i, c in enumerate(text) if c == ","]
    splits = [(text[:i].strip(), text[i + 1 :].strip()) for i in cuts]
    found = [(a, b) for a, b in splits if a in methods and b in methods and a != b]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DapqError(
            f"--paired {text!r} can be read as {' or '.join(f'{a} | {b}' for a, b in found)}; "
            "name the variant with @label so no key holds a comma "
            "(--methods speckv@self --param speckv@self.draft=self)."
        )
    if len(splits) != 1 or not all(splits[0]) or splits[0][0] == splits[0][1]:
        raise DapqError(
            f"--paired takes two different method keys as A,B (e.g. learned,laq); got {text!r}. "
            f"Methods there: {', '.join(methods)}."
        )
    missing = [k for k in splits[0] if k not in methods]
    raise DapqError(f"--paired: no rows of {', '.join(missing)} in these results. Methods there: {', '.join(methods)}.")


REST = "the rest"  # the group of every task no --group names


def parse_group(text: str) -> tuple[str, list[str]]:
    """'NAME=task,task,...' (`dapq report --group`) -> (NAME, tasks in order); a one-line DapqError otherwise."""
    name, sep, listed = str(text).partition("=")
    name = name.strip()
    tasks = list(dict.fromkeys(t.strip() for t in listed.split(",") if t.strip()))
    if not sep or not name or not tasks:
        raise DapqError(
            f"--group takes NAME=task,task,... (e.g. needle-shaped=niah_multiquery,niah_multivalue); got {text!r}."
        )
    if name == REST:
        raise DapqError(f"--group: {REST!r} is the group of every task no --group names; give yours another name.")
    return name, tasks


def check_groups(groups: list[tuple[str, list[str]]], present: set[str]) -> None:
    """Groups (`parse_group`) that name tasks of the rows (`present`), each task in one group, each name once; a
    one-line DapqError that lists the tasks there otherwise."""
    names = [name for name, _ in groups]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DapqError(f"--group: the name {twice[0]!r} is given twice; give each group its own name.")
    owner: dict[str, str] = {}
    for name, tasks in groups:
        missing = [t for t in tasks if t not in present]
        if missing:
            raise DapqError(
                f"--group {name}: no rows of task {', '.join(missing)} in these results. Tasks there: "
                f"{', '.join(sorted(present))}."
            )
        for t in tasks:
            if t in owner:
                raise DapqError(f"--group: task {t} is in both {owner[t]} and {name}; put each task in one group.")
            owner[t] = name


def _scores(rows: list[dict[str, Any]], method: str) -> dict[Any, dict[tuple[str, str], float]]:
    """{budget: {(task, sample_id): score}} of one method; one row per prompt and budget, or an error."""
    out: dict[Any, dict[tuple[str, str], float]] = defaultdict(dict)
    for r in rows:
        if r["method_key"] != method:
            continue
        key = (r["task"], r["sample_id"])
        cell = out[r["budget"]]
        if key in cell:
            raise DapqError(
                f"--paired: {method} has two rows for {r['sample_id']} at budget {r['budget']} (two runs in one "
                "folder?); report the runs one at a time."
            )
        cell[key] = float(r["score"])
    return out


def _budgets(sa: dict[Any, Any], sb: dict[Any, Any]) -> list[tuple[Any, Any, Any]]:
    """(shown budget, a's budget, b's budget) pairs: a budgetless side (FullKV) pairs with every budget."""
    ba, bb = set(sa), set(sb)
    if ba == {None} or bb == {None}:
        shown = sorted((ba | bb) - {None}, key=float) or [None]
        return [(s, None if ba == {None} else s, None if bb == {None} else s) for s in shown]
    return [(s, s, s) for s in sorted((ba & bb) - {None}, key=float)]


def paired(rows: list[dict[str, Any]], a: str, b: str, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> list[Paired]:
    """`a` against `b` at every budget both have (one `Paired` each), on the prompts both scored there."""
    import numpy as np

    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise DapqError(f"n_boot must be a positive integer; got {n_boot!r}")
    sa, sb = _scores(rows, a), _scores(rows, b)
    out = []
    for shown, ka, kb in _budgets(sa, sb):
        ca, cb = sa.get(ka, {}), sb.get(kb, {})
        by_task: dict[str, list[float]] = defaultdict(list)
        for key in sorted(ca.keys() & cb.keys()):
            by_task[key[0]].append(ca[key] - cb[key])
        if not by_task:
            continue
        rng = np.random.default_rng(seed)
        boot = np.zeros(n_boot)
        for task in sorted(by_task):
            d = np.asarray(by_task[task])  # [n_t]
            boot += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)  # [n_boot]
        boot /= len(by_task)
        diffs = [x for v in by_task.values() for x in v]
        out.append(
            Paired(
                a=a,
                b=b,
                budget=shown,
                tasks=len(by_task),
                samples=len(diffs),
                diff=float(np.mean([np.mean(v) for v in by_task.values()])),
                low=float(np.percentile(boot, 2.5)),
                high=float(np.percentile(boot, 97.5)),
                p_not_better=float(np.mean(boot <= 0)),
                wins=sum(x > 0 for x in diffs),
                losses=sum(x < 0 for x in diffs),
                ties=sum(x == 0 for x in diffs),
            )
        )
    return out


PAIRED_HEADERS = [
    "A",
    "B",
    "budget",
    "tasks",
    "prompts",
    "AVG(A) - AVG(B)",
    "95% interval",
    "P(A <= B)",
    "wins/losses/ties",
]


def paired_cells(p: Paired) -> list[str]:
    """One table row of a comparison, as text."""
    budget = "-" if p.budget is None else str(p.budget)
    return [
        p.a,
        p.b,
        budget,
        str(p.tasks),
        str(p.samples),
        f"{p.diff:+.2f}",
        f"[{p.low:+.2f}, {p.high:+.2f}]",
        f"{p.p_not_better:.3f}",
        f"{p.wins}/{p.losses}/{p.ties}",
    ]
