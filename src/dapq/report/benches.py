"""The measured TTFT and peak-memory files of `dapq bench ttft|memory` that `dapq report --front` reads in place of
the harness's own accounting (`--ttft FILE`, `--memory FILE`, one file per budget), checked on load."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checks import clean_label
from ..errors import DapqError

#: rows of the bench JSONs that are not methods (the plain model; the activations-only baseline)
NOT_METHODS = ("transformers", "activations only")
#: kind -> the field of a bench cell this module reads
BENCH_FIELDS = {"ttft": "ttft_s", "memory": "peak_over_activations"}
#: the loaded files of one kind (`load_benches`), one per budget
Benches = list[dict[str, Any]]


def load_bench(path: str | Path, kind: str) -> dict[str, Any]:
    """A `dapq bench ttft` / `dapq bench memory` result (kind "ttft" / "memory"), checked; else a one-line DapqError."""
    p = Path(path)
    what = f"the {kind}.json that `dapq bench {kind}` writes"
    if not p.is_file():
        raise DapqError(f"--{kind} {p}: no such file; pass {what}.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DapqError(f"--{kind} {p} is not JSON; pass {what}.") from None
    if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("rows"), dict):
        found = data.get("kind") if isinstance(data, dict) else None
        raise DapqError(f"--{kind} {p} is not a `dapq bench {kind}` result (kind {found!r}); pass {what}.")
    field = BENCH_FIELDS[kind]
    for method, cells in data["rows"].items():
        if method in NOT_METHODS:
            continue
        if not isinstance(cells, dict) or not all(isinstance(c, dict) for c in cells.values()):
            raise DapqError(f"--{kind} {p}: row {method!r} is not a table of lengths; pass {what}.")
        for length, cell in cells.items():
            value = cell.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DapqError(
                    f"--{kind} {p}: {clean_label(method)!r} at {clean_label(length)} has no finite, non-negative "
                    f"{field!r}; pass {what}."
                )
            _cell_length(cell, length, p)
    budget = data.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise DapqError(f"--{kind} {p} has no finite, non-negative budget; pass {what}.")
    data["rows"] = {clean_label(m, limit=10_000): cells for m, cells in data["rows"].items()}  # names as rows clean
    data["_path"] = str(p)
    return data


def _cell_length(cell: dict[str, Any], key: str, path: Path) -> int:
    tokens = cell.get("prompt_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        return tokens
    try:
        return int(key)
    except ValueError:
        raise DapqError(f"{path}: length {key!r} is not a number; pass a file written by `dapq bench`.") from None


def load_benches(paths: str | Path | Sequence[str | Path] | None, kind: str) -> Benches | None:
    """Several bench results of one kind, one per budget (`--memory a.json --memory b.json`); None for none."""
    if paths is None:
        return None
    benches = [load_bench(p, kind) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    budgets = [float(b["budget"]) for b in benches]
    for budget in budgets:
        if budgets.count(budget) > 1:
            names = ", ".join(b["_path"] for b in benches if float(b["budget"]) == budget)
            raise DapqError(f"--{kind}: {names} are all at budget {budget:g}; pass one file per budget.")
    return benches or None


def bench_value(benches: Benches | None, method: str, budget: Any, tokens: float | None) -> tuple[float, int] | None:
    """(value, bench length) of `method` at `budget` in the bench file of that budget, at the length nearest to
    `tokens`; None when no file measured that method at that budget. FullKV (budget None) matches the first file
    that measured it, whatever its budget."""
    if not benches or method in NOT_METHODS:
        return None
    for bench in benches:
        cells = bench["rows"].get(method)
        if not cells or (budget is not None and float(budget) != float(bench["budget"])):
            continue
        path = Path(bench["_path"])
        options = [(_cell_length(c, k, path), c) for k, c in cells.items()]
        target = tokens if tokens is not None else min(n for n, _ in options)
        length, cell = min(options, key=lambda o: (abs(o[0] - target), o[0]))
        return float(cell[BENCH_FIELDS[bench["kind"]]]), length
    return None
