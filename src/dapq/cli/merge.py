"""`dapq merge`: the result rows of several `dapq eval` run folders (or .jsonl / .jsonl.gz files) as one gzipped JSONL.

dapq merge runs/est4k-a runs/est4k-b --out docs/results/estimators/ruler-4k.jsonl.gz
dapq merge runs/a docs/results/front/ruler-2k.jsonl.gz --out merged.jsonl.gz
dapq merge runs/qwen runs/smollm2 --keep-apart --out both.jsonl.gz   # two configurations in one file
dapq merge runs/ruler-all --samples 5 --out first5.jsonl.gz           # only samples 0-4 of every task (5-9: 5 to 9)

Rows are deduplicated by (sample, method, budget, method config), the first one read wins; error rows are dropped;
the same rows give the same bytes. Inputs of different configurations are refused unless --keep-apart
(see dapq.runs.merge). --samples keeps only some sample indices (the `-s<N>` of a sample id), so rows of runs with
more samples pair with a shorter run's prompts. The output is never written through a link, over a folder, another
kind of file, or an input.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    mp = sub.add_parser(
        "merge",
        help="merge the result rows of several runs into one .jsonl.gz",
        description="Merge the result rows of `dapq eval` run folders (their results.jsonl) and .jsonl / .jsonl.gz "
        "results files into one gzipped JSON-lines file: the first row of each (sample, method, budget, method "
        "config) wins, error rows are dropped, and the same rows always give the same bytes. Rows of different "
        "configurations (model, dtype, mode, seed, bench options, dapq version: a row's config_id) are refused "
        "unless --keep-apart.",
    )
    mp.add_argument(
        "inputs",
        nargs="+",
        metavar="input",
        help="a run folder written by `dapq eval` (runs/<bench>-<hash>) or a .jsonl / .jsonl.gz results file",
    )
    mp.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the merged .jsonl.gz (a new file, or a gzip file to replace; never one of the inputs)",
    )
    mp.add_argument(
        "--keep-apart",
        action="store_true",
        help="keep the rows of every configuration (deduplicated within each) instead of refusing inputs of "
        "different configurations; every row keeps its config_id, so the configurations stay apart in the file",
    )
    mp.add_argument(
        "--samples",
        metavar="N|LO-HI",
        help="keep only these samples of every task: N the first N (as dapq eval --samples N), LO-HI the indices "
        "LO to HI (the number after -s in a sample id)",
    )
    mp.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace, console: Any) -> int:
    from ..checks import clean_label
    from ..runs.merge import merge_files, parse_samples

    samples = parse_samples(args.samples) if args.samples is not None else None
    result = merge_files(args.inputs, args.out, keep_apart=args.keep_apart, samples=samples)
    # plain print of a cleaned line: a path is never read as rich markup, wrapped, or a terminal control sequence
    print(clean_label(result.line(), limit=10_000), flush=True)
    return 0
