"""The joint table of docs/results/estimators.md: accuracy (NIAH, RULER 2k / 4k) beside TTFT and measured peak memory.

    python scripts/estimators/joint_table.py --niah runs/est-niah --ruler runs/est-ruler \
        --ttft runs/est-ttft/ttft.json --memory runs/est-memory/memory.json

Reads the result rows of `dapq eval` (results.jsonl or .jsonl.gz) and the JSON of `dapq bench ttft|memory`, and
prints markdown: per method and budget, the NIAH mean over all cells, the RULER AVG over tasks at each length (and
the samples per task), the harness's own per-row extra costs (context pass, draft), then per method the median
TTFT and the allocator-measured peak per prompt length. Nothing is computed here that the rows do not hold.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, median
from typing import Any

from dapq.runs import load_rows

MiB = 2**20


def rows(path: str | None) -> list[dict[str, Any]]:
    """The rows of a run folder, a results.jsonl or a committed .jsonl.gz (dapq's reader: checked, torn lines cut)."""
    if not path:
        return []
    p = Path(path)
    return load_rows(p / "results.jsonl" if p.is_dir() else p, repair=False)


def label(row: dict[str, Any]) -> tuple[str, Any]:
    return row["method_key"], row["budget"]


def niah_table(data: list[dict[str, Any]]) -> dict[tuple[str, Any], float]:
    by: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in data:
        by[label(r)].append(r["score"])
    return {k: mean(v) for k, v in by.items()}


def ruler_table(
    data: list[dict[str, Any]],
) -> tuple[dict[tuple[str, Any, int], float], dict[int, int], dict[int, int]]:
    """AVG over tasks of the per-task mean, per (method, budget, length); the smallest and largest n per task."""
    by: dict[tuple[str, Any, int, str], list[float]] = defaultdict(list)
    for r in data:
        length = int(r["metadata"].get("length", r["metadata"].get("max_length", 0)))
        by[(*label(r), length, r["task"])].append(r["score"])
    tasks: dict[tuple[str, Any, int], list[float]] = defaultdict(list)
    n_min: dict[int, int] = {}
    n_max: dict[int, int] = {}
    for (m, b, length, _task), v in by.items():
        tasks[(m, b, length)].append(mean(v))
        n_min[length] = min(n_min.get(length, 10**9), len(v))
        n_max[length] = max(n_max.get(length, 0), len(v))
    return {k: mean(v) for k, v in tasks.items()}, n_min, n_max


def costs(data: list[dict[str, Any]]) -> dict[tuple[str, Any], dict[str, float]]:
    by: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in data:
        by[label(r)].append(r)
    return {
        k: {
            "pass_s": median(r.get("pass_s", 0.0) for r in v),
            "draft_s": median(r.get("draft_s", 0.0) for r in v),
            "kv_peak_mib": median(r["kv_bytes_peak"] for r in v) / MiB,
            "kept_mean": mean(r["kept_mean"] for r in v),
        }
        for k, v in by.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--niah")
    ap.add_argument("--ruler")
    ap.add_argument("--ttft")
    ap.add_argument("--memory")
    args = ap.parse_args()
    niah, ruler = rows(args.niah), rows(args.ruler)
    n_acc = niah_table(niah)
    r_acc, n_min, n_max = ruler_table(ruler)
    lengths = sorted(n_min)
    keys = sorted({label(r) for r in niah + ruler}, key=lambda k: (k[0] != "full", str(k[1]), k[0]))
    cost = costs(ruler or niah)
    head = ["method", "budget"] + ([f"NIAH ({len(niah) // max(1, len(keys))} cells)"] if niah else [])
    head += [f"RULER {n} (n={n_min[n]}-{n_max[n]}/task)" for n in lengths]
    head += ["accounted KV peak MiB (median row)", "context pass s", "draft s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in keys:
        c = cost.get(k, {})
        cells = [k[0], str(k[1] if k[1] is not None else "-")]
        cells += [f"{n_acc[k]:.1f}" if k in n_acc else "-"] if niah else []
        cells += [f"{r_acc[(*k, n)]:.1f}" if (*k, n) in r_acc else "-" for n in lengths]
        cells += [f"{c.get('kv_peak_mib', 0):.1f}", f"{c.get('pass_s', 0):.1f}", f"{c.get('draft_s', 0):.1f}"]
        print("| " + " | ".join(cells) + " |")
    for path, kind in ((args.ttft, "ttft"), (args.memory, "memory")):
        if not path:
            continue
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        lens = [str(n) for n in result["lengths"]]
        print(f"\n{kind} (budget {result['budget']}), per prompt length:\n")
        print("| method | " + " | ".join(lens) + " |")
        print("|---|" + "---|" * len(lens))
        for name, cells in result["rows"].items():
            vals = []
            for n in lens:
                cell = cells.get(n) or cells.get(int(n)) or {}
                if kind == "ttft":
                    vals.append(f"{cell['ttft_s']:.2f} s" if cell else "-")
                else:
                    vals.append(f"{cell['peak_bytes'] / MiB:.0f} MiB" if cell else "-")
            print(f"| {name} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
