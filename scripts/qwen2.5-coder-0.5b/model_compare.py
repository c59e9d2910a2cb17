"""Two models on the same grids: per method and budget the NIAH mean and the RULER AVG, and whether the orderings held.

    python scripts/qwen2.5-coder-0.5b/model_compare.py --names Qwen,SmolLM2 \
        --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1 \
        --niah docs/results/qwen2.5-coder-0.5b/niah.jsonl.gz docs/results/qwen2.5-coder-0.5b/smollm2-niah.jsonl.gz \
        --ruler docs/results/qwen2.5-coder-0.5b/ruler-2k.jsonl.gz docs/results/estimators/ruler-2k.jsonl.gz+...
    (the full commands: docs/results/qwen2.5-coder-0.5b.md)

Reads the result rows of `dapq eval` (results.jsonl or .jsonl.gz; several joined by '+') of the same grid on two
models and prints markdown: one table per bench and budget (both models side by side, on the sample ids both scored;
a method measured on one model only shows its own samples' value, marked),
then per bench and budget each model's ranking of the methods they share, the Kendall tau between the two rankings,
and every pair of methods whose order differs between the models with the gap on each. Nothing here is computed
that the rows do not hold.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from statistics import mean
from typing import Any

from dapq.runs import row_key  # a row's identity, as `dapq merge` and a resumed run use it

# scripts/estimators/joint_table.py: one reader of result rows for every script
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "estimators"))
from joint_table import rows  # noqa: E402

Key = tuple[str, Any]  # (method, budget)


def cells(data: list[dict[str, Any]]) -> dict[Key, dict[str, dict[str, float]]]:
    """{(method, budget): {task: {sample_id: score}}}; `learned,queries=...` is `learned`."""
    out: dict[Key, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in data:
        if r.get("error") is None:
            out[(r["method_key"].split(",")[0], r["budget"])][r["task"]][r["sample_id"]] = float(r["score"])
    return out


def avg(cell: dict[str, dict[str, float]], ids: set[str]) -> float:
    """AVG over tasks of the per-task mean score on the sample ids in `ids`."""
    return mean(mean(v for i, v in per.items() if i in ids) for per in cell.values() if any(i in ids for i in per))


def ids_of(cell: dict[str, dict[str, float]]) -> set[str]:
    return {i for per in cell.values() for i in per}


def per_task(cell: dict[str, dict[str, float]], ids: set[str]) -> str:
    ns = sorted({sum(i in ids for i in per) for per in cell.values()})
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def joined(spec: str, tasks: str | None) -> list[dict[str, Any]]:
    """The rows of one or more files joined by '+', the first row of a (sample, method, budget) wins; only `tasks`
    (comma-separated, without the bench prefix, e.g. niah_single_1) when given."""
    keep = {t.strip() for t in tasks.split(",")} if tasks else None
    out: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for path in spec.split("+"):
        for r in rows(path):
            key = row_key(r["sample_id"], r["method_key"], r["budget"])  # without the config: the first file wins
            if key in seen or (keep is not None and r["task"].split("/")[-1] not in keep):
                continue
            seen.add(key)
            out.append(r)
    return out


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


def bench_section(title: str, names: list[str], data: list[list[dict[str, Any]]]) -> list[str]:
    tabs = [cells(d) for d in data]
    out = [f"### {title}", ""]
    budgets = sorted({b for t in tabs for (_m, b) in t if b is not None})
    methods: list[str] = []
    for t in tabs:
        for m, _b in t:
            if m not in methods:
                methods.append(m)
    for b in budgets:
        out += [f"#### Budget {b}", ""]
        out.append(f"| method | {names[0]} | {names[1]} | samples per task (both) |")
        out.append("|---|---|---|---|")
        for m in methods:
            key = (m, b) if (m, b) in tabs[0] or (m, b) in tabs[1] else (m, None)
            if key not in tabs[0] and key not in tabs[1]:
                continue
            both = key in tabs[0] and key in tabs[1]
            ids = ids_of(tabs[0][key]) & ids_of(tabs[1][key]) if both else set()
            if ids:
                vals = [f"{avg(t[key], ids):.1f}" for t in tabs]
                n = per_task(tabs[0][key], ids)
            else:  # one model only: its own samples, marked
                vals = [f"({avg(t[key], ids_of(t[key])):.1f})" if key in t else "" for t in tabs]
                own = next(i for i, t in enumerate(tabs) if key in t)
                n = f"{names[own]} only: {per_task(tabs[own][key], ids_of(tabs[own][key]))}"
            label = m if key[1] is not None else f"{m} (no budget)"
            out.append(f"| {label} | {vals[0]} | {vals[1]} | {n} |")
        out.append("")
        shared = [m for m in methods if m != "full" and all((m, b) in t for t in tabs)]
        common = set.intersection(*(ids_of(t[(m, b)]) for t in tabs for m in shared)) if shared else set()
        if len(shared) < 2 or not common:
            out += ["Too few methods measured on both models at this budget to rank.", ""]
            continue
        vals = [[avg(t[(m, b)], common) for m in shared] for t in tabs]
        tau = kendall_tau(vals[0], vals[1])
        n = per_task(tabs[0][(shared[0], b)], common)
        out.append(
            f"Rankings on the samples every ranked method scored on both models ({n} per task): "
            f"Kendall tau = {tau:.2f} over {len(shared)} methods."
        )
        for name, v in zip(names, vals):
            ranked = sorted(zip(shared, v), key=lambda x: -x[1])
            out.append(f"- {name}: " + " > ".join(f"{m} {s:.1f}" for m, s in ranked))
        flips = []
        for i, j in combinations(range(len(shared)), 2):
            da, db = vals[0][i] - vals[0][j], vals[1][i] - vals[1][j]
            if da * db < 0:
                flips.append(f"{shared[i]} vs {shared[j]}: {names[0]} {da:+.1f}, {names[1]} {db:+.1f}")
        pairs = len(shared) * (len(shared) - 1) // 2
        out.append(f"- pairs in opposite order ({len(flips)} of {pairs}): " + ("; ".join(flips) if flips else "none"))
        out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", required=True, help="two labels, comma-separated, in the order of the files")
    ap.add_argument("--niah", nargs=2, metavar="ROWS")
    ap.add_argument("--ruler", nargs=2, metavar="ROWS")
    ap.add_argument("--tasks", help="only these RULER tasks (comma-separated), e.g. niah_single_1,niah_multikey_1")
    args = ap.parse_args()
    names = args.names.split(",")
    if len(names) != 2:
        raise SystemExit("--names takes two labels, e.g. --names qwen,smollm2")
    out: list[str] = []
    if args.niah:
        out += bench_section("NIAH (word recall x 100)", names, [joined(p, None) for p in args.niah])
    if args.ruler:
        out += bench_section("RULER 2k AVG (string_match x 100)", names, [joined(p, args.tasks) for p in args.ruler])
    print("\n".join(out))


if __name__ == "__main__":
    main()
