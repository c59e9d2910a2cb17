"""`dapq demo`: the README demo, needle questions answered with FullKV, SnapKV, DapQ, LAQ and learned queries on the
bundled model."""

from __future__ import annotations

import argparse
from typing import Any

from .args import parse_budget, parse_names


def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="needle-in-a-haystack demo: FullKV, SnapKV, DapQ, LAQ, learned queries on the bundled model",
        description="Five needle questions (depths 10-90 %) answered by each method; prints one table.",
    )
    demo.add_argument("--budget", default="128", help="tokens kept per head, or a ratio < 1 (default 128)")
    demo.add_argument("--context-tokens", type=int, default=1000, help="haystack length in tokens (default 1000)")
    demo.add_argument(
        "--model", default=None, help="hub id or local folder (default: the bundled SmolLM2-135M-Instruct)"
    )
    demo.add_argument(
        "--methods", default="full,snapkv,dapq,laq,learned", help="comma-separated method names (see `dapq list`)"
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from ..demo import run_demo

    budget = parse_budget(args.budget)
    methods = tuple(parse_names(args.methods, "--methods"))
    run_demo(budget=budget, context_tokens=args.context_tokens, model_name=args.model, console=console, methods=methods)
    return 0
