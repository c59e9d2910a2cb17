"""The `dapq` command line.

dapq demo                                    # the README demo on the bundled model
dapq list                                    # methods and their parameters
dapq generate --method dapq --budget 128 --context-file report.txt --question "Who signed it?"
dapq generate --method dapq --budget 0.1 --param n_pseudo_tokens=16 --param content=RC_C --context-file f.txt -q "..."
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import DapqError
from .generation import MODES, generate
from .methods import get_method, list_methods


def _parse_value(text: str) -> Any:
    if text in ("None", "none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items:
        if "=" not in item:
            raise DapqError(f"--param takes key=value (e.g. --param n_pseudo_tokens=16); got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value.strip())
    return params


def _budget(text: str) -> int | float:
    value = _parse_value(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise argparse.ArgumentTypeError(f"budget must be a token count (e.g. 128) or a ratio (e.g. 0.1); got {text!r}")
    return value


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="dapq methods (pass parameters with --param key=value)")
    table.add_column("method")
    table.add_column("parameters (defaults)")
    table.add_column("description")
    for name, cls in list_methods().items():
        params = ", ".join(
            f"{f.name}={f.default!r}"
            for f in dataclasses.fields(cls)
            if f.init and f.default is not dataclasses.MISSING
        )
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, params, doc)
    console.print(table)
    return 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    from .models import load_model

    if args.context_file is not None:
        path = Path(args.context_file)
        if not path.is_file():
            raise DapqError(f"--context-file {path} does not exist.")
        context = path.read_text(encoding="utf-8")
    else:
        context = args.context or ""
    params = _parse_params(args.param)
    if args.budget is not None:
        params["budget"] = args.budget
    method = get_method(args.method, **params)  # validate before the (slow) model load
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    out = generate(
        model,
        tok,
        context,
        args.question,
        method,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        chat_template=False if args.no_chat_template else None,
        answer_prefix=args.answer_prefix,
    )
    if args.json:
        print(json.dumps({"text": out.text, "stats": out.stats}, indent=2))
    else:
        console.print(out.text)
        s = out.stats
        console.print(
            f"[dim]{method.describe()} | prompt {s['prompt_tokens'][0]} tokens | kept per layer (mean) "
            f"{sum(s['kept_per_layer']) / len(s['kept_per_layer']):.1f} | KV {s['kv_bytes_full'] / 2**20:.2f} -> "
            f"{s['kv_bytes_compressed'] / 2**20:.2f} MiB | prefill {s['prefill_s']:.2f} s, "
            f"decode {s['decode_s']:.2f} s[/]"
        )
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from .demo import run_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_demo(
        budget=args.budget, context_tokens=args.context_tokens, model_name=args.model, console=console, methods=methods
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapq", description="KV-cache eviction with position-aware pseudo queries.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list methods and their parameters").set_defaults(func=cmd_list)

    gen = sub.add_parser("generate", help="answer a question about a context with a compressed KV cache")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--context-file", help="text file with the context")
    src.add_argument("--context", help="the context as a string")
    gen.add_argument("--question", "-q", required=True)
    gen.add_argument("--method", default="dapq", help="method name (see `dapq list`); default dapq")
    gen.add_argument("--budget", type=_budget, help="tokens kept per head (int) or ratio of the prompt (0 < x < 1)")
    gen.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    gen.add_argument("--mode", choices=MODES, default="query_aware")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--answer-prefix", default="")
    gen.add_argument("--no-chat-template", action="store_true")
    gen.add_argument("--model", default=None, help="hub id or local folder (default: bundled SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    gen.add_argument("--attn", default="sdpa", help="attention backend under the hook: sdpa, eager, flash_attention_2")
    gen.add_argument("--json", action="store_true", help="print text and stats as JSON")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="needle-in-a-haystack demo: FullKV vs SnapKV vs DapQ on the bundled model")
    demo.add_argument("--budget", type=int, default=128)
    demo.add_argument("--context-tokens", type=int, default=1500)
    demo.add_argument("--model", default=None)
    demo.add_argument("--methods", default="full,snapkv,dapq", help="comma-separated method names (see `dapq list`)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    console = Console()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, console)
    except DapqError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
