"""`dapq report <folder>`: tables (terminal + report.md) and PNG figures from result files only.

dapq report runs/ruler-1a2b3c4d5e
dapq report runs/ruler-1a2b3c4d5e --paired learned,laq --paired learned,snapkv
dapq report runs/ruler-1a2b3c4d5e --paired learned,laq --group needles=niah_multiquery,niah_multivalue
dapq report --front runs/ruler-1a2b3c4d5e runs/ruler-... --ttft ttft.json --memory memory.json --out docs/front
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import DapqError
from .args import parse_names


def add_parser(sub: Any) -> None:
    rp = sub.add_parser(
        "report",
        help="tables (terminal + markdown) and figures from a results folder",
        description="Read results.jsonl files under a folder and write report.md and PNG figures next to them. "
        "With --front: accuracy against peak KV and against TTFT for every method and budget of one or more runs "
        "(front.md and PNGs), marking the points no other point beats on all three.",
    )
    rp.add_argument(
        "paths",
        nargs="+",
        metavar="path",
        help="a results folder (runs/<bench>-<hash>), a folder of several, or a results.jsonl (several: --front only)",
    )
    rp.add_argument(
        "--front",
        action="store_true",
        help="the accuracy-memory-time front: front.md and front*.png instead of the tables",
    )
    rp.add_argument(
        "--ttft",
        metavar="FILE",
        action="append",
        help="with --front: the ttft.json of `dapq bench ttft` (measured TTFT instead of the harness's); repeat it "
        "for the files of other budgets",
    )
    rp.add_argument(
        "--memory",
        metavar="FILE",
        action="append",
        help="with --front: the memory.json of `dapq bench memory` (measured peak instead of the accounted KV peak); "
        "repeat it for the files of other budgets",
    )
    rp.add_argument(
        "--same-samples",
        action="store_true",
        help="with --front: keep only the samples every method and budget of a table scored",
    )
    rp.add_argument(
        "--methods",
        metavar="A,B,...",
        help="with --front: only these method keys' points (picked before --same-samples)",
    )
    rp.add_argument(
        "--paired",
        metavar="A,B",
        action="append",
        help="without --front: after each length's tables, method A against B on the prompts both scored (AVG "
        "difference, 95%% task-stratified paired-bootstrap interval, wins/losses/ties); repeat it for more pairs",
    )
    rp.add_argument(
        "--group",
        metavar="NAME=task,...",
        action="append",
        help="with --paired: the paired comparisons again within these tasks (task names as in the tables), and "
        "within every task no group names ('the rest'); repeat it for more groups",
    )
    rp.add_argument(
        "--bootstrap",
        metavar="N",
        type=int,
        default=None,
        help="with --paired: bootstrap draws (default 10000)",
    )
    rp.add_argument(
        "--out", metavar="DIR", help="with --front: where front.md and the PNGs go (default: the first path)"
    )
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, console: Any) -> int:
    from ..extras import check_extra

    if args.front:
        given = [f"--{name}" for name in ("paired", "group", "bootstrap") if getattr(args, name) is not None]
        if given:
            raise DapqError(f"{', '.join(given)} do not go with --front: drop them, or report one run without --front.")
    if args.bootstrap is not None and not args.paired:
        raise DapqError("--bootstrap only goes with --paired A,B: add --paired or drop it.")
    if args.bootstrap is not None and args.bootstrap < 1:
        raise DapqError(f"--bootstrap must be a positive number of draws; got {args.bootstrap}.")
    if not args.front:
        given = [f"--{name}" for name in ("ttft", "memory", "methods", "out") if getattr(args, name) is not None]
        given += ["--same-samples"] if args.same_samples else []
        if given:
            raise DapqError(f"{', '.join(given)} only go with --front: add --front or drop them.")
        if len(args.paths) > 1:
            raise DapqError(
                f"dapq report takes one path ({len(args.paths)} given); pass a folder that holds them all, or --front."
            )
    check_extra("eval")
    if args.front:
        from ..report.front import write_front

        write_front(
            args.paths,
            ttft=args.ttft,
            memory=args.memory,
            out=args.out,
            console=console,
            same_samples=args.same_samples,
            methods=parse_names(args.methods, "--methods") if args.methods is not None else None,
        )
        return 0
    from ..report.paired import DEFAULT_BOOT
    from ..report.tables import write_report

    write_report(args.paths[0], console, pairs=args.paired, n_boot=args.bootstrap or DEFAULT_BOOT, groups=args.group)
    return 0
