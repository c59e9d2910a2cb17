"""`dapq analyze similarity|recall|attention`: the paper's observations (Table 1, Figures 2a/2b and 3, Table 8).

    dapq analyze similarity --length 4096 --trials 100 --offset-lengths 1024,2048,4096
    dapq analyze recall --length 4096 --samples 4 --budget 128
    dapq analyze attention --length 4096 --samples 4 --budget 128

Each writes <kind>.json, <kind>.md and <kind>.png into the output folder (default runs/analysis-<kind>-<config
hash>) and prints the table. Per-prompt results are appended to items.jsonl as they finish, so an interrupted run
resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from ..errors import DapqError

KINDS = ("similarity", "recall", "attention")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DapqError(f"{name} takes comma-separated integers (e.g. 1,2,4); got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise DapqError(f"{name} needs positive integers; got {text!r}")
    return values


class Checkpoint:
    """Finished items of a run (key -> JSON value), appended with flush + fsync; a torn last line is ignored."""

    def __init__(self, path: Path):
        from ..bench.runner import load_rows

        self.path = path
        self.items = {row["key"]: row["value"] for row in load_rows(path)}

    def save(self, key: str, value: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.items[key] = value


def add_analyze_parser(sub: Any) -> None:
    """Add `analyze` and its three subcommands to the top-level subparsers."""
    an = sub.add_parser("analyze", help="the paper's observations: query similarity, window recall, attention")
    kinds = an.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--task", default="summary", help="summary (essays), niah, ruler/<task>, longbench/<subset> (with --data-dir)"
    )
    common.add_argument("--length", type=int, default=4096, help="prompt tokens")
    common.add_argument("--samples", type=int, default=None, help="prompts to average over")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--data-dir", default=None)
    common.add_argument("--out", default=None, help="output folder (default: runs/analysis-<kind>-<hash>; resumes)")
    common.add_argument("--model", default=None, help="hub id or local folder (default: bundled SmolLM2)")
    common.add_argument("--dtype", default=None)
    common.add_argument("--device", default=None)
    common.add_argument("--attn", default="sdpa")
    p = kinds.add_parser("similarity", parents=[common], help="Table 1 and Figure 2a/2b: query cosine")
    p.add_argument("--tokens", type=int, default=32, help="N: answer / pseudo tokens compared")
    p.add_argument("--trials", type=int, default=100, help="random draws per condition (Figure 2a)")
    p.add_argument("--offset-lengths", default="1024,2048,4096", help="context lengths of the offset curves")
    p.add_argument("--points", type=int, default=25, help="start positions per offset curve (plus dense near L)")
    for kind in ("recall", "attention"):
        help_text = "Figure 3: recall of each window" if kind == "recall" else "Table 8: attention-distribution cosine"
        p = kinds.add_parser(kind, parents=[common], help=help_text)
        p.add_argument("--budget", type=int, default=128, help="B: gold and predicted set size")
        p.add_argument("--windows", default="1,2,4,8,16,32,64,128")
        p.add_argument("--contents", default="auto,RS_C,RC_C,Fix_C,random_vocab", help="DapQ contents to compare")
        p.add_argument("--answer-tokens", type=int, default=128, help="length of the model's greedy answer")
    an.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    from ..bench.runner import config_hash
    from ..models import load_model
    from .sources import analysis_prompts

    kind = args.kind
    if kind not in KINDS:
        raise DapqError(f"Unknown analysis {kind!r}; choose one of {', '.join(KINDS)}.")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "out", "command", "device", "attn")}
    out = Path(args.out) if args.out else Path("runs") / f"analysis-{kind}-{config_hash(config)}"
    windows = _ints(args.windows, "--windows") if kind != "similarity" else []
    offset_lengths = _ints(args.offset_lengths, "--offset-lengths") if kind == "similarity" else []
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(out / "items.jsonl")
    if ckpt.items:
        console.print(f"resuming: {len(ckpt.items)} finished item(s) in {out / 'items.jsonl'}")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    n = args.samples or (1 if kind == "similarity" else 4)
    prompts = analysis_prompts(tok, args.task, args.length, n, seed=args.seed, data_dir=args.data_dir)

    def progress(msg: str) -> None:
        console.print(f"  {msg}")

    if kind == "similarity":
        from . import similarity as mod

        offset_prompts = [
            p for length in offset_lengths for p in analysis_prompts(tok, args.task, length, 1, args.seed)
        ]
        result = mod.run_similarity(
            model,
            tok,
            prompts,
            offset_prompts,
            n_tokens=args.tokens,
            trials=args.trials,
            points=args.points,
            seed=args.seed,
            progress=progress,
            done=ckpt.items,
            on_result=ckpt.save,
        )
        md = mod.markdown(result)
        mod.figure(result, str(out / f"{kind}.png"))
    else:
        from . import recall as mod

        contents = [c.strip() for c in args.contents.split(",") if c.strip()]
        result = mod.run_windows(
            model,
            tok,
            prompts,
            budget=args.budget,
            windows=windows,
            contents=contents,
            answer_tokens=args.answer_tokens,
            seed=args.seed,
            progress=progress,
            done=ckpt.items,
            on_result=ckpt.save,
        )
        md = mod.markdown(result, kind)
        mod.figure(result, kind, str(out / f"{kind}.png"))
    result["config"] = {**config, "model": args.model or "smollm2-135m-instruct"}
    (out / f"{kind}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    (out / f"{kind}.md").write_text(md, encoding="utf-8")
    console.print(Markdown(md))
    console.print(f"wrote {out / (kind + '.json')}, {out / (kind + '.md')}, {out / (kind + '.png')}")
    return 0
