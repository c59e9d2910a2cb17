"""Two models on the same grids: per method and budget the NIAH mean and the RULER AVG, and whether the orderings held.

    python scripts/model_compare.py --names qwen,smollm2 \
        --niah docs/results/qwen/niah.jsonl.gz docs/results/qwen/smollm2-niah.jsonl.gz \
        --ruler docs/results/qwen/ruler-2k.jsonl.gz docs/results/qwen/smollm2-ruler-2k.jsonl.gz

Reads the result rows of `dapq eval` (results.jsonl or .jsonl.gz) of the same grid measured on two models and prints
markdown: one table per bench (method x budget, both models side by side, on the sample ids both models scored),
then per bench and budget each model's ranking of the methods they share, the Kendall tau between the two rankings,
and every pair of methods whose order differs between the models with the gap on each. Nothing here is computed
that the rows do not hold.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from itertools import combinations
from statistics import mean
from typing import Any

from estimator_tables import rows  # the same folder: one reader of result rows for every script

Key = tuple[str, Any]  # (method, budget)


def scores(data: list[dict[str, Any]], ids: set[str]) -> dict[Key, float]:
    """AVG over tasks of the per-task mean score, per (method, budget), on the sample ids in `ids`."""
    by: dict[tuple[str, Any, str], list[float]] = defaultdict(list)
    for r in data:
        if r.get("error") is None and r["sample_id"] in ids:
            by[(r["method_key"], r["budget"], r["task"])].append(float(r["score"]))
    tasks: dict[Key, list[float]] = defaultdict(list)
    for (m, b, _t), v in by.items():
        tasks[(m, b)].append(mean(v))
    return {k: mean(v) for k, v in tasks.items()}


def n_per_task(data: list[dict[str, Any]], ids: set[str]) -> dict[str, int]:
    seen: dict[str, set[str]] = defaultdict(set)
    for r in data:
        if r["sample_id"] in ids:
            seen[r["task"]].add(r["sample_id"])
    return {t: len(v) for t, v in sorted(seen.items())}


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (ties count as neither agreeing nor disagreeing)."""
    conc = disc = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def fmt_budget(b: Any) -> str:
    return "-" if b is None else str(b)


def bench_section(title: str, names: list[str], data: list[list[dict[str, Any]]]) -> list[str]:
    ids = set.intersection(*({r["sample_id"] for r in d} for d in data))
    tabs = [scores(d, ids) for d in data]
    out = [f"### {title}", ""]
    out.append(f"Samples per task (scored by both models): {n_per_task(data[0], ids)}")
    out.append("")
    budgets = sorted({b for t in tabs for (_m, b) in t if b is not None})
    methods: list[str] = []
    for t in tabs:
        for m, _b in t:
            if m not in methods:
                methods.append(m)
    head = ["method"] + [f"{n} {b}" for b in budgets for n in names]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for m in methods:
        cells = [m]
        for b in budgets:
            for t in tabs:
                v = t.get((m, b), t.get((m, None)))  # FullKV has no budget: the same value in every column
                cells.append("" if v is None else f"{v:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for b in budgets:
        shared = [m for m in methods if m != "full" and all((m, b) in t for t in tabs)]
        vals = [[t[(m, b)] for m in shared] for t in tabs]
        tau = kendall_tau(vals[0], vals[1])
        out.append(f"**Budget {b}**: Kendall tau between the two rankings of {len(shared)} methods = {tau:.2f}.")
        for n, v in zip(names, vals):
            ranked = sorted(zip(shared, v), key=lambda x: -x[1])
            out.append(f"- {n}: " + " > ".join(f"{m} {s:.1f}" for m, s in ranked))
        flips = []
        for i, j in combinations(range(len(shared)), 2):
            da, db = vals[0][i] - vals[0][j], vals[1][i] - vals[1][j]
            if da * db < 0:
                flips.append(f"{shared[i]} vs {shared[j]}: {names[0]} {da:+.1f}, {names[1]} {db:+.1f}")
        out.append(
            f"- pairs in a different order ({len(flips)} of {len(shared) * (len(shared) - 1) // 2}): "
            + ("; ".join(flips) if flips else "none")
        )
        out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", required=True, help="two labels, comma-separated, in the order of the files")
    ap.add_argument("--niah", nargs=2, metavar="ROWS")
    ap.add_argument("--ruler", nargs=2, metavar="ROWS")
    args = ap.parse_args()
    names = args.names.split(",")
    if len(names) != 2:
        raise SystemExit("--names takes two labels, e.g. --names qwen,smollm2")
    out: list[str] = []
    if args.niah:
        out += bench_section("NIAH (word recall x 100)", names, [rows(p) for p in args.niah])
    if args.ruler:
        out += bench_section("RULER 2k AVG (string_match x 100)", names, [rows(p) for p in args.ruler])
    print("\n".join(out))


if __name__ == "__main__":
    main()
