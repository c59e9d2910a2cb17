"""`dapq report <folder>`: tables (terminal + report.md) and PNG figures from result files only."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    rp = sub.add_parser(
        "report",
        help="tables (terminal + markdown) and figures from a results folder",
        description="Read results.jsonl files under a folder and write report.md and PNG figures next to them.",
    )
    rp.add_argument("path", help="a results folder (runs/<bench>-<hash>), a folder of several, or a results.jsonl")
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, console: Any) -> int:
    from ..bench.report import write_report
    from ..extras import check_extra

    check_extra("eval")
    write_report(args.path, console)
    return 0
