"""`dapq ablate content|length|position`: the paper's DapQ ablations (Figure 4a/4b/4c), through the harness.

    dapq ablate content                          # Fig. 4a: N = 32, content F4_L28, F8_L24, F2_L30, RS_C, RC_C, ...
    dapq ablate length --values 1,8,32,128       # Fig. 4b: N in {1, 2, ..., 128} (content 'auto')
    dapq ablate position --task ruler/niah_single_1 --lengths 4096 --budgets 64,128

The experiment itself (variants, plan, summaries, figures) is `dapq.analysis.ablate`; this module parses and checks
the command line (before the model load) and runs it into runs/ablate-<kind>-<config hash> (resumable).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..analysis import ablate as lib
from ..analysis.ablate_report import KINDS
from .args import (
    MODES,
    add_model_options,
    check_model_options,
    load_model_from_args,
    parse_budgets,
    parse_lengths,
    run_dir,
)

NOT_HASHED = ("func", "out", "command", "device", "attn")
HELPS = {
    "content": "Figure 4a: N fixed, pseudo-query content varied (F4_L28, F8_L24, F2_L30, RS_C, RC_C, Fix_C, ...)",
    "length": "Figure 4b: pseudo-query count N in 1, 2, 4, ..., 128 (content auto)",
    "position": "Figure 4c: pseudo positions inside the prompt (part1-3) or shifted after it (+0 .. +512)",
}


def _value_text(kind: str, value: Any) -> str:
    return f"+{value}" if kind == "position" and isinstance(value, int) else str(value)


def add_parser(sub: Any) -> None:
    """Add `ablate` and its subcommands content|length|position to the top-level subparsers (sets `func`)."""
    ab = sub.add_parser(
        "ablate",
        help="the paper's DapQ ablations: pseudo-query content, length N, position (Fig. 4)",
        description="DapQ variants plus SnapKV and FullKV references through the evaluation harness; writes "
        "ablate-<kind>.json, .md and .png (a rerun resumes).",
    )
    kinds = ab.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--task", default="niah", help=lib.ABLATE_TASK_HELP)
    common.add_argument(
        "--lengths", default=str(lib.DEFAULT_LENGTH), help="prompt lengths in tokens, comma list or range"
    )
    common.add_argument(
        "--samples",
        type=int,
        default=lib.DEFAULT_SAMPLES,
        help=f"per length: NIAH depths or RULER samples (default {lib.DEFAULT_SAMPLES})",
    )
    common.add_argument("--budgets", default="128", help="comma-separated cache budgets (default 128)")
    common.add_argument("--values", default=None, help="override the variant list (see each subcommand's help)")
    common.add_argument("--seed", type=int, default=0, help="task generation and DapQ's random contents / spans")
    common.add_argument(
        "--mode", choices=MODES, default="query_aware", help="query_aware (default) or question_agnostic"
    )
    common.add_argument("--data-dir", default=None, help="SQuAD/HotpotQA files for ruler/qa_1 and ruler/qa_2")
    common.add_argument("--out", default=None, help="output folder (default: runs/ablate-<kind>-<hash>; resumes)")
    add_model_options(common)
    for kind in KINDS:
        defaults = ",".join(_value_text(kind, v) for v in lib.DEFAULT_VALUES[kind])
        p = kinds.add_parser(
            kind,
            parents=[common],
            help=HELPS[kind],
            description=f"{HELPS[kind]}. --values: {lib.VALUES_HELP[kind]}; default (N = 32) {defaults}.",
        )
        if kind != "length":
            p.add_argument("--n-pseudo", type=int, default=32, help="pseudo queries N (default 32, as the paper)")
    ab.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace, console: Any) -> int:
    """Run `dapq ablate <kind>`: validate everything, load the model, run, write and print the outputs."""
    import dataclasses

    from ..errors import DapqError
    from ..extras import check_extra
    from ..runs import RESULTS, open_run
    from .evaluate import run_config

    kind = args.kind
    lib.check_kind(kind)
    values = lib.parse_values(kind, args.values) if args.values else None
    n_pseudo = getattr(args, "n_pseudo", 32)
    lib.variants(kind, values, n_pseudo=n_pseudo, seed=args.seed)  # fail fast, before the model load
    budgets = parse_budgets(args.budgets)
    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise DapqError(f"--samples must be >= 1; got {args.samples}")
    lib.check_task(args.task)
    check_extra("eval")
    check_model_options(args)
    out = run_dir(args, f"ablate-{kind}", NOT_HASHED)
    config = run_config(args, args.task)
    out = open_run(out, dataclasses.replace(config, extra={**config.extra, "ablation": kind}), check_only=True)
    model, tok = load_model_from_args(args)
    samples = lib.build_samples(tok, args.task, lengths, args.samples, seed=args.seed, data_dir=args.data_dir)
    console.print(f"ablate {kind}: {len(samples)} sample(s), budgets {', '.join(map(str, budgets))} -> {out}")
    lib.run_ablation(
        model,
        tok,
        samples,
        kind,
        budgets,
        out,
        values=values,
        n_pseudo=n_pseudo,
        seed=args.seed,
        config=config,
        console=console,
        extra={"lengths": lengths, "budgets": budgets},
    )
    stem = out / f"ablate-{kind}"
    console.print(f"wrote {stem}.json, {stem}.md, {stem}.png (rows: {out / RESULTS})")
    return 0
