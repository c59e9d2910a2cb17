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
from typing import Any

from ..analysis.observe import KINDS
from ..errors import DapqError
from .args import (
    DEFAULT_MODEL_NAME,
    add_model_options,
    check_model_options,
    load_model_from_args,
    parse_ints,
    parse_names,
    run_dir,
)

NOT_HASHED = ("func", "out", "command", "device", "attn")
TASK_HELP = "summary (the essays, default), niah, ruler/<task>, longbench/<subset> (with --data-dir)"


def add_parser(sub: Any) -> None:
    an = sub.add_parser(
        "analyze",
        help="the paper's observations: query similarity, window recall, attention",
        description="The paper's observations on real decoding queries, captured from the model's own greedy answer.",
    )
    kinds = an.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--task", default="summary", help=f"prompt source: {TASK_HELP}")
    common.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    common.add_argument(
        "--samples", type=int, default=None, help="prompts to average over (default 1 for similarity, else 4)"
    )
    common.add_argument("--seed", type=int, default=0, help="seed of the prompts and random draws (default 0)")
    common.add_argument("--data-dir", default=None, help="data folder of ruler/qa_* and longbench/<subset>")
    common.add_argument("--out", default=None, help="output folder (default: runs/analysis-<kind>-<hash>; resumes)")
    add_model_options(common)
    p = kinds.add_parser("similarity", parents=[common], help="Table 1 and Figure 2a/2b: query cosine")
    p.add_argument("--tokens", type=int, default=32, help="N: answer / pseudo tokens compared")
    p.add_argument("--trials", type=int, default=100, help="random draws per condition (Figure 2a)")
    p.add_argument("--offset-lengths", default="1024,2048,4096", help="context lengths of the offset curves")
    p.add_argument("--points", type=int, default=25, help="start positions per offset curve (plus dense near L)")
    for kind in ("recall", "attention"):
        help_text = "Figure 3: recall of each window" if kind == "recall" else "Table 8: attention-distribution cosine"
        p = kinds.add_parser(kind, parents=[common], help=help_text)
        p.add_argument("--budget", type=int, default=128, help="B: gold and predicted set size")
        p.add_argument(
            "--windows", default="1,2,4,8,16,32,64,128", help="observation window sizes compared (comma list)"
        )
        p.add_argument("--contents", default="auto,RS_C,RC_C,Fix_C,random_vocab", help="DapQ contents to compare")
        p.add_argument("--answer-tokens", type=int, default=128, help="length of the model's greedy answer")
    an.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace, console: Any) -> int:
    from rich.markdown import Markdown

    from .. import models
    from ..analysis.observe import Observation, open_folder, run_observation
    from ..extras import check_extra
    from ..tasks import check_task

    kind = args.kind
    if kind not in KINDS:
        raise DapqError(f"Unknown analysis {kind!r}; choose one of {', '.join(KINDS)}.")
    similarity = kind == "similarity"
    config = {k: v for k, v in vars(args).items() if k not in NOT_HASHED}
    obs = Observation(
        kind=kind,
        task=args.task,
        length=args.length,
        samples=args.samples,
        seed=args.seed,
        data_dir=args.data_dir,
        offset_lengths=tuple(parse_ints(args.offset_lengths, "--offset-lengths")) if similarity else (),
        windows=tuple(parse_ints(args.windows, "--windows")) if not similarity else (),
        contents=tuple(parse_names(args.contents, "--contents")) if not similarity else (),
        **{k: getattr(args, k) for k in ("tokens", "trials", "points", "budget", "answer_tokens") if hasattr(args, k)},
        config={**config, "model": args.model or DEFAULT_MODEL_NAME},
    )
    check_task(args.task)  # before the model load
    check_extra("eval")
    check_model_options(args)
    out = run_dir(args, f"analysis-{kind}", NOT_HASHED)
    # one configuration per folder: the analysis options and the model's fingerprint (run.json, as `dapq eval`)
    out = open_folder(obs, out, args.model or DEFAULT_MODEL_NAME, models.model_fingerprint(args.model))
    md = run_observation(
        obs,
        out,
        lambda: load_model_from_args(args),
        progress=lambda msg: console.print(f"  {msg}"),
        on_resume=lambda n: console.print(f"resuming: {n} finished item(s) in {out / 'items.jsonl'}"),
    )
    console.print(Markdown(md))
    console.print(f"wrote {out / (kind + '.json')}, {out / (kind + '.md')}, {out / (kind + '.png')}")
    return 0
