"""Paired comparisons per task group: method A against B on the prompts both scored, within each group of tasks.

    python scripts/learned-generic/task_groups.py runs/generic-ruler-2048 --paired learned@generic,laq \
        --group needle-shaped=niah_multikey_1,niah_multiquery,niah_multivalue,niah_single_2

Prints, per group (the named tasks, then every other task as "the rest") and per budget, the AVG difference with its
95% task-stratified paired-bootstrap interval (`dapq.report.paired`, as `dapq report --paired`), as markdown. The
needle-shaped group above is the RULER tasks whose shape the needle recipe's training prompts copy (one locker
number; four keys, one asked; a list of values for one person). Nothing is computed that the rows do not hold.
"""

from __future__ import annotations

import argparse
import sys

from dapq.errors import DapqError
from dapq.report.paired import PAIRED_HEADERS, paired, paired_cells, parse_pair
from dapq.report.tables import load_all, task_label


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a results folder (or a .jsonl / .jsonl.gz file)")
    ap.add_argument("--paired", action="append", required=True, metavar="A,B")
    ap.add_argument("--group", action="append", default=[], metavar="NAME=task,task,...")
    ap.add_argument("--bootstrap", type=int, default=10_000)
    args = ap.parse_args()
    try:
        rows = load_all(args.path)
        methods = list(dict.fromkeys(r["method_key"] for r in rows))
        compared = [parse_pair(text, methods) for text in args.paired]
        groups: dict[str, set[str]] = {}
        for g in args.group:
            name, _, tasks = g.partition("=")
            groups[name] = {t.strip() for t in tasks.split(",") if t.strip()}
        named = set().union(*groups.values()) if groups else set()
        present = {task_label(r) for r in rows}
        groups["the rest"] = present - named
        for name, tasks in groups.items():
            subset = [r for r in rows if task_label(r) in tasks]
            print(f"\n### {name} ({len(tasks & present)} tasks: {', '.join(sorted(tasks & present))})\n")
            print("| " + " | ".join(PAIRED_HEADERS) + " |")
            print("|---" * len(PAIRED_HEADERS) + "|")
            for a, b in compared:
                for p in paired(subset, a, b, n_boot=args.bootstrap):
                    print("| " + " | ".join(paired_cells(p)) + " |")
    except DapqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
