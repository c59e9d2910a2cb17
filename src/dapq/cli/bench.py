"""`dapq bench ttft|throughput|memory`: efficiency (the paper's Tables 3, 4 and 7), `dapq.bench.speed`.

dapq bench ttft       --lengths 1k,2k,4k --methods full,snapkv,dapq,laq --budget 256
dapq bench throughput --context 4k --new-tokens 150 --batch-sizes 1,4,8,16 --budget 256 --memory-cap 4GiB
dapq bench memory     --lengths 1k,2k,4k --methods full,snapkv,dapq,laq --budget 256

The side-by-side comparison with NVIDIA kvpress runs in kvpress's own virtualenv and is the reproduction script of
its results page: `python scripts/kvpress/vs_kvpress.py` in a source checkout (docs/results/kvpress.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import DapqError
from .args import (
    DEFAULT_MODEL_NAME,
    add_model_options,
    check_model_options,
    check_out,
    check_positive,
    load_model_from_args,
    parse_budget,
    parse_lengths,
    parse_method_params,
    parse_names,
    parse_size,
    run_dir,
)

NOT_HASHED = ("func", "out", "command")
ALL_METHODS = "full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,dapq"


def add_parser(sub: Any) -> None:
    """Add `bench` with ttft / throughput / memory to the top-level subparsers."""
    bp = sub.add_parser(
        "bench",
        help="efficiency: time to first token, decode throughput, peak memory, vs kvpress",
        description="Efficiency benchmarks; JSON and a markdown table in runs/bench-<kind>-<config hash>/.",
    )
    kinds = bp.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--methods", default=ALL_METHODS, help=f"comma-separated method names (default {ALL_METHODS})")
    common.add_argument(
        "--param",
        dest="bench_params",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method parameter (repeatable); variants: --methods learned@mine --param learned@mine.queries=q.pt",
    )
    common.add_argument("--budget", default="256", help="tokens kept per head (or a ratio < 1); default 256")
    common.add_argument("--out", default=None, help="output folder (default: runs/bench-<kind>-<config hash>)")
    add_model_options(common)
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p = kinds.add_parser("ttft", parents=[common], help="time to first token per method and prompt length")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens (default 1k,2k,4k)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell, interleaved across methods")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per cell before the timed ones (default 1)")
    p = kinds.add_parser("memory", parents=[common], help="peak allocated memory of the compressing prefill")
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens (default 1k,2k,4k)")
    p = kinds.add_parser("throughput", parents=[common], help="decode tokens/s per batch size, memory per batch")
    p.add_argument("--context", default="4k", help="prompt length in tokens (default 4k)")
    p.add_argument("--new-tokens", type=int, default=150, help="tokens decoded per row (default 150)")
    p.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated batch sizes (default 1,4,8,16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default 3)")
    p.add_argument("--memory-cap", default=None, help="e.g. 4GiB: which batch sizes fit (the paper's OOM column)")
    bp.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace, console: Any) -> int:
    budget = parse_budget(args.budget)
    methods = parse_names(args.methods, "--methods")
    for option in ("repeats", "new_tokens", "threads"):
        check_positive(getattr(args, option, None), f"--{option.replace('_', '-')}")
    if getattr(args, "warmup", 0) < 0:
        raise DapqError(f"--warmup must be an integer >= 0; got {args.warmup!r}")
    check_out(args)
    check_model_options(args)
    if args.kind == "throughput":
        context = parse_lengths(args.context, "--context", "4k or 4096")[0]
        batch_sizes = parse_lengths(args.batch_sizes, "--batch-sizes", "1,4,8,16")
        cap = parse_size(args.memory_cap) if args.memory_cap else None
    else:
        lengths = parse_lengths(args.lengths, "--lengths", "1k,2k,4k")

    import json

    import torch
    from rich.markdown import Markdown

    from ..bench import speed

    params = parse_method_params(args.bench_params)
    unknown = set(params) - set(methods)
    if unknown:
        raise DapqError(f"--param names method(s) not in --methods: {', '.join(sorted(unknown))}")
    for name in methods:
        speed.build_method(name, budget, params)  # unknown names, bad budgets and files fail before the model load
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_dir(args, f"bench-{args.kind}", NOT_HASHED)
    model, tok = load_model_from_args(args)

    def progress(msg: str) -> None:
        console.print(f"  {msg}")

    if args.kind == "ttft":
        result = speed.bench_ttft(
            model,
            tok,
            lengths,
            methods,
            budget,
            repeats=args.repeats,
            warmup=args.warmup,
            params=params,
            progress=progress,
        )
    elif args.kind == "memory":
        result = speed.bench_memory(model, tok, lengths, methods, budget, params=params, progress=progress)
    else:
        result = speed.bench_throughput(
            model,
            tok,
            context,
            args.new_tokens,
            batch_sizes,
            methods,
            budget,
            repeats=args.repeats,
            memory_cap=cap,
            params=params,
            progress=progress,
        )
    config = {k: v for k, v in vars(args).items() if k not in NOT_HASHED}
    result["machine"] = speed.machine_info(model)
    result["config"] = {**config, "model": args.model or DEFAULT_MODEL_NAME}
    md = speed.markdown(result)
    from ..safefile import ensure_dir, write_text

    ensure_dir(out)
    write_text(out / f"{args.kind}.json", json.dumps(result, indent=1, default=str), "json")
    write_text(out / f"{args.kind}.md", md, "markdown")
    console.print(Markdown(md))
    m = result["machine"]
    console.print(f"{m['device_name']} ({m['device']}), {m['torch_threads']} threads -> {out / (args.kind + '.json')}")
    return 0
