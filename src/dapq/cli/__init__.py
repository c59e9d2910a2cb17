"""The `dapq` command line: one module per command, shared argument parsers in `args.py`.

    dapq list                                    # methods and their parameters
    dapq models                                  # offline models: installed?, converted?, install commands
    dapq generate --method dapq --budget 128 --context-file report.txt --question "Who signed it?"
    dapq demo                                    # the README demo on the bundled model
    dapq eval niah|ruler|longbench|longbench-v2|helmet ...      # the evaluation harness (resumable)
    dapq report runs/<folder>                    # tables and figures from result files
    dapq report --front runs/<a> runs/<b>        # accuracy vs peak KV and TTFT per method and budget, the front
    dapq merge runs/<a> runs/<b> --out m.jsonl.gz # several runs' rows as one file, deduplicated
    dapq analyze similarity|recall|attention     # the paper's observations
    dapq ablate content|length|position          # the paper's DapQ ablations
    dapq bench ttft|throughput|memory            # efficiency

Building the parser imports no model code: torch, transformers, matplotlib, rich's progress bars and the harness are
imported inside the command that needs them, so `dapq --help`, `dapq list` and `dapq <command> --help` are fast.
Bad input is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import DapqError
from . import ablate, analyze, bench, chat, demo, evaluate, generate, listing, merge, models, report, train
from .args import Parser

__all__ = ["build_parser", "main"]

#: command modules in the order `dapq --help` lists them; each has add_parser(subparsers)
COMMANDS = (listing, models, generate, chat, demo, evaluate, analyze, ablate, bench, train, report, merge)


def build_parser() -> argparse.ArgumentParser:
    """The `dapq` parser; every subcommand sets `func(args, console) -> exit code`."""
    parser = Parser(prog="dapq", description="KV-cache eviction with position-aware pseudo queries.")
    parser.add_argument("--version", action="version", version=f"dapq {__version__}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line (`argv` without the program name; default sys.argv[1:]) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from rich.console import Console

    # with --json, stdout carries the JSON only: everything else goes to stderr
    to_stderr = bool(getattr(args, "json", False))
    stream = sys.stderr if to_stderr else sys.stdout
    # a pipe, a file or a CI log has no width: print tables whole there instead of cutting cells to fit 80 columns
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 400
    console = Console(stderr=to_stderr, width=width)
    try:
        return args.func(args, console)
    except DapqError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)  # one line on stderr, never wrapped
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(text: str) -> str:
    """An error message on one line (inner newlines and runs of spaces collapsed, control and bidi characters from
    file names or file contents removed, so an error never drives the terminal)."""
    from ..checks import clean_label

    return clean_label(text, limit=100_000)
