"""Merge the result rows of several `dapq eval` folders (or .jsonl / .jsonl.gz files) into one gzipped JSONL.

    python scripts/merge_rows.py runs/est4k-a runs/est4k-b --out docs/results/estimators/ruler-4k.jsonl.gz

Sweeps split over processes each start from a copy of the committed rows, so the same row appears in several
inputs: a row is kept once per `dapq.bench.runner.row_key` (sample, method, budget, config), the first one read
wins. Error rows are dropped (they are not results). The gzip header carries no time stamp, so the same rows give
the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys

from estimator_tables import rows  # the same folder: one reader of result rows for both scripts

from dapq.bench.runner import row_key  # the key a resumed run skips on: merged rows are unique in the same sense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seen: set[tuple] = set()
    out: list[dict] = []
    dropped = 0
    for path in args.inputs:
        try:
            found = rows(path)
        except (OSError, ValueError) as e:  # not a results file (a .log beside the folders, a torn copy, ...)
            print(
                f"merge_rows.py: {path} is not a results folder or JSONL file ({e}); pass those only.", file=sys.stderr
            )
            sys.exit(2)
        for row in found:
            if row.get("error"):
                dropped += 1
                continue
            k = row_key(row["sample_id"], row["method_key"], row["budget"], row.get("method_config"))
            if k not in seen:
                seen.add(k)
                out.append(row)
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for row in out:
            gz.write((json.dumps(row) + "\n").encode())
    print(f"{len(out)} rows ({dropped} error rows dropped) -> {args.out}")


if __name__ == "__main__":
    main()
