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

from .engine import MODES, generate
from .errors import DapqError
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
        doc = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."  # the first sentence
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
            f"{s['kv_bytes_compressed'] / 2**20:.2f} MiB (peak {s['kv_bytes_peak'] / 2**20:.2f}) | "
            f"prefill {s['prefill_s']:.2f} s, "
            f"decode {s['decode_s']:.2f} s[/]"
        )
    return 0


def parse_lengths(text: str) -> list[int]:
    """'1000-4000:500' (start-stop:step, inclusive), '2048,4096' or '1k,2k'."""

    def one(x: str) -> int:
        x = x.strip().lower()
        return int(float(x[:-1]) * 1000) if x.endswith("k") else int(x)

    try:
        if "-" in text:
            span, _, step = text.partition(":")
            lo, hi = (one(x) for x in span.split("-"))
            return list(range(lo, hi + 1, one(step) if step else 500))
        return [one(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise DapqError(f"--lengths takes '1000-4000:500' or '2048,4096'; got {text!r}") from exc


def _method_specs(names: str, params: list[str]) -> list[Any]:
    from .bench.runner import MethodSpec

    per_method: dict[str, dict[str, Any]] = {}
    for item in params:
        key, _, value = item.partition("=")
        if "." not in key or not _:
            raise DapqError(f"--param takes method.key=value (e.g. dapq.n_pseudo_tokens=16); got {item!r}")
        name, field = key.split(".", 1)
        per_method.setdefault(name.strip(), {})[field.strip()] = _parse_value(value.strip())
    specs = [MethodSpec.of(n.strip(), **per_method.get(n.strip(), {})) for n in names.split(",") if n.strip()]
    unknown = set(per_method) - {s.name for s in specs}
    if unknown:
        raise DapqError(f"--param names method(s) not in --methods: {', '.join(sorted(unknown))}")
    return specs


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from .bench.runner import RunConfig, config_hash, run
    from .models import load_model

    specs = _method_specs(args.methods, args.param)
    budgets = [_budget(b) for b in args.budgets.split(",") if b.strip()]
    for spec in specs:  # fail fast on bad methods/budgets, before the model load
        for b in budgets if spec.uses_budget else [None]:
            spec.build(b)
    bench_args = {k: v for k, v in vars(args).items() if k not in ("func", "out", "command", "device", "attn")}
    out = Path(args.out) if args.out else Path("runs") / f"{args.bench}-{config_hash(bench_args)}"
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    samples = _samples(args, tok)
    console.print(f"{len(samples)} samples x {len(specs)} methods -> {out}")
    run(
        model,
        tok,
        samples,
        specs,
        budgets,
        out,
        config=RunConfig(
            model=args.model or "smollm2-135m-instruct", mode=args.mode, seed=args.seed, extra={"bench": args.bench}
        ),
        console=console,
    )
    console.print(f"results: {out / 'results.jsonl'}   tables and figures: dapq report {out}")
    return 0


def _samples(args: argparse.Namespace, tok: Any) -> list[Any]:
    if args.bench == "niah":
        from .bench.niah import niah_samples

        return niah_samples(tok, parse_lengths(args.lengths), args.depths, seed=args.seed)
    if args.bench == "ruler":
        from .bench.base import round_robin
        from .bench.ruler import RULER_TASKS, ruler_samples

        tasks = RULER_TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        groups = [
            ruler_samples(tok, task, length, args.samples or 50, seed=args.seed, data_dir=args.data_dir)
            for length in parse_lengths(args.lengths)
            for task in tasks
        ]
        return round_robin(groups)  # sample i of every (length, task) before sample i + 1: a stopped run is balanced
    if args.bench == "longbench":
        from .bench.longbench import LONGBENCH_SUBSETS, longbench_samples

        subsets = LONGBENCH_SUBSETS if args.subsets == "all" else [x.strip() for x in args.subsets.split(",")]
        return [
            s
            for subset in subsets
            for s in longbench_samples(
                tok,
                subset,
                data_dir=args.data_dir,
                from_hub=args.from_hub,
                max_prompt_tokens=args.max_prompt_tokens,
                n=args.samples,
            )
        ]
    if args.bench == "longbench-v2":
        from .bench.longbench_v2 import longbench_v2_samples

        return longbench_v2_samples(tok, args.data_file, max_prompt_tokens=args.max_prompt_tokens, n=args.samples)
    from .bench.helmet import HELMET_SUBSETS, helmet_samples

    subsets = HELMET_SUBSETS if args.subsets == "all" else [x.strip() for x in args.subsets.split(",") if x.strip()]
    return [
        s
        for subset in subsets
        for s in helmet_samples(
            tok,
            subset,
            args.data_dir,
            length=args.length,
            max_prompt_tokens=args.max_prompt_tokens,
            n=args.samples,
            from_hub=args.from_hub,
        )
    ]


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from .bench.report import write_report

    write_report(args.path, console)
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

    ev = sub.add_parser("eval", help="benchmarks: niah, ruler, longbench, longbench-v2, helmet (resumable)")
    bench = ev.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--methods", default="full,snapkv,dapq", help="comma-separated method names")
    common.add_argument("--budgets", default="128", help="comma-separated budgets (tokens, or ratios < 1)")
    common.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE")
    common.add_argument("--mode", choices=MODES, default="query_aware")
    common.add_argument("--samples", type=int, default=None, help="samples per task (default: all / 50 for RULER)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--out", default=None, help="output folder (default: runs/<bench>-<config hash>; reruns resume)"
    )
    common.add_argument("--model", default=None)
    common.add_argument("--dtype", default=None)
    common.add_argument("--device", default=None)
    common.add_argument("--attn", default="sdpa")
    common.add_argument("--max-prompt-tokens", type=int, default=None, help="truncate real-data prompts (head + tail)")
    p = bench.add_parser("niah", parents=[common], help="Kamradt needle in a haystack (Paul Graham essays)")
    p.add_argument("--lengths", default="1000-4000:500")
    p.add_argument("--depths", type=int, default=10, help="number of depths, round(linspace(0, 100, n))")
    p = bench.add_parser("ruler", parents=[common], help="the RULER synthetic tasks, generated offline")
    p.add_argument("--tasks", default="all")
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--data-dir", default=None, help="folder with SQuAD/HotpotQA files for qa_1/qa_2")
    p = bench.add_parser("longbench", parents=[common], help="LongBench v1 English subsets from local files")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subsets", default="all")
    p.add_argument("--from-hub", action="store_true", help="download THUDM/LongBench (needs network and `datasets`)")
    p = bench.add_parser("longbench-v2", parents=[common], help="LongBench v2 from a local file")
    p.add_argument("--data-file", required=True)
    p = bench.add_parser("helmet", parents=[common], help="HELMET subsets from local files")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subsets", default="all")
    p.add_argument("--length", type=int, default=8192, help="HELMET input length (picks RAG files, ICL shots)")
    p.add_argument("--from-hub", action="store_true", help="download from the hub (needs network and `datasets`)")
    ev.set_defaults(func=cmd_eval)

    from .analysis.ablate import add_ablate_parser
    from .analysis.cli import add_analyze_parser
    from .bench.speed import add_bench_parser

    add_analyze_parser(sub)
    add_ablate_parser(sub)
    add_bench_parser(sub)

    rp = sub.add_parser("report", help="tables (terminal + markdown) and figures from a results folder")
    rp.add_argument("path")
    rp.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    console = Console()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "vs-kvpress"]:  # everything after it goes to scripts/vs_kvpress.py, options included
        from .bench.speed import _vs_kvpress

        try:
            return _vs_kvpress([a for a in argv[2:] if a != "--"], console)
        except DapqError as exc:
            console.print(f"[red]error:[/] {exc}", highlight=False)
            return 2
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
