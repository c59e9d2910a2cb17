"""`dapq train-queries`: learned pseudo queries for the `learned` method (`dapq.train`).

    dapq train-queries --out runs/queries/smollm2.pt                       # the bundled model, defaults
    dapq train-queries --model ./my-model --n-queries 16 --loss gold --out q.pt
    dapq eval ruler --methods learned --param learned.queries=q.pt ...    # use them

Writes q.pt (the best epoch's embeddings), q.pt.json (settings, per-epoch history, the split), q.png (loss curves
and validation recall) and q.pt.ckpt (every epoch: rerun the same command to resume; --restart starts over), all
through dapq's safe-write path; every one of them is checked (no link, no folder, no file of another kind) and the
lock `.q.pt.lock` taken before the model loads, so a bad --out or a second run on it fails at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .args import DEFAULT_MODEL_NAME, add_model_options, check_model_options, load_model_from_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-queries",
        help="train learned pseudo queries (the `learned` method) with the model frozen",
        description=(
            "Train N input embeddings whose attention over the prompt matches the attention of the model's own "
            "greedy answer, on prompts disjoint from every evaluation (see dapq.train.corpus)."
        ),
    )
    p.add_argument("--out", required=True, help="the queries file to write (e.g. runs/queries/q.pt)")
    p.add_argument("--n-queries", type=int, default=32, help="N learned embeddings (default 32)")
    p.add_argument(
        "--recipe",
        default="generic",
        help="generic (task-agnostic: self-QA, continue, summary, quote over plain text; default) or needles",
    )
    p.add_argument("--train", type=int, default=None, help="training prompts (default: 400 generic, 60 needles)")
    p.add_argument("--val", type=int, default=None, help="validation prompts (default: 40 generic, 15 needles)")
    p.add_argument("--lengths", default="512-2048", help="prompt tokens LO-HI, drawn uniformly (default 512-2048)")
    p.add_argument("--kinds", default=None, help="prompt kinds of the recipe (default all of them)")
    p.add_argument(
        "--text",
        default="essays,docs",
        help="the generic recipe's text: essays, then any of docs (transformers' description and licence), lists "
        "(Pygments' lexer registry, matplotlib's rc file: many records alike); default essays,docs",
    )
    p.add_argument("--answer-tokens", type=int, default=24, help="longest greedy answer used as target (24)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 3 generic, 8 needles)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--batch", type=int, default=4, help="prompts per optimizer step (default 4)")
    p.add_argument("--loss", default="kl", help="kl (match the distribution, default) or gold (gold-set mass)")
    p.add_argument(
        "--target",
        default="mean",
        help="mean (the answer's mean attention, default), copy (only the answer steps that continue a run of the "
        "prompt) or recon (KVzip's reconstruction importance: no answer asked)",
    )
    p.add_argument("--budget", type=int, default=128, help="gold-set size for the gold loss and recall (128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training prompts (offset from the evaluations')")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="capacity step: rank-R adapters active at the pseudo positions only (default 0: embeddings alone)",
    )
    p.add_argument(
        "--lora-modules",
        default="q_proj,k_proj,v_proj,o_proj",
        help="the projections the adapters wrap (default q_proj,k_proj,v_proj,o_proj; also gate/up/down_proj)",
    )
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale alpha / rank (default alpha 16)")
    p.add_argument("--lora-lr", type=float, default=0.002, help="Adam learning rate of the adapters (0.002)")
    p.add_argument(
        "--build-only",
        action="store_true",
        help="fill the target store and exit, claiming one prompt at a time: run as many such processes side by "
        "side as the device holds, then train",
    )
    add_model_options(p)
    p.set_defaults(func=cmd_train)


def _lengths(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise DapqError(f"--lengths must be LO-HI tokens (e.g. 512-2048); got {text!r}") from None
    return lo, hi


def cmd_train(args: argparse.Namespace, console: Any) -> int:
    from ..extras import check_extra

    out = Path(args.out)
    if out.is_dir() and not out.is_symlink():
        raise DapqError(f"--out {out} is a folder: pass a file name such as {out / 'queries.pt'}.")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else ()
    generic = args.recipe == "generic"
    defaults = {"train": 400 if generic else 60, "val": 40 if generic else 15, "epochs": 3 if generic else 8}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_extra("eval")  # matplotlib for the loss curve
    check_model_options(args)

    from ..safefile import FileLock
    from ..train.corpus import training_prompts
    from ..train.fit import TrainOutputs, build_targets, check_buildable, train_queries
    from ..train.generic import drafts
    from ..train.settings import TrainSettings

    settings = TrainSettings(
        n_queries=args.n_queries,
        n_train=args.train,
        n_val=args.val,
        lengths=_lengths(args.lengths),
        kinds=kinds,
        answer_tokens=args.answer_tokens,
        epochs=args.epochs,
        lr=float(args.lr),
        batch=args.batch,
        loss=args.loss,
        budget=args.budget,
        seed=args.seed,
        recipe=args.recipe,
        texts=tuple(t.strip() for t in args.text.split(",") if t.strip()),
        target=args.target,
        lora_rank=args.lora_rank,
        lora_modules=tuple(m.strip() for m in args.lora_modules.split(",") if m.strip()),
        lora_alpha=float(args.lora_alpha),
        lora_lr=float(args.lora_lr),
    )
    if args.build_only:
        check_buildable(settings)  # before the model load
    outputs = TrainOutputs.of(out)  # links, folders, foreign files, an unwritable folder: before the model load
    if not args.build_only:  # builders fill the store side by side; training holds the lock
        with FileLock(outputs.lock, str(out)):  # another run on this --out: now, not after the model load
            pass
    model, tok = load_model_from_args(args)
    if settings.recipe == "needles":  # bad kinds / lengths: before any work
        training_prompts(tok, 1, settings.lengths, settings.seed, settings.kinds)
    else:
        drafts(1, settings.lengths, settings.seed, settings.kinds, settings.texts)
    from ..harness.runner import sweep_progress

    with sweep_progress(console) as bar:
        tasks: dict[str, Any] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        if args.build_only:
            build_targets(
                model,
                tok,
                settings,
                out,
                model_name=args.model or DEFAULT_MODEL_NAME,
                progress=progress,
                log=bar.console.print,
            )
            return 0
        result = train_queries(
            model,
            tok,
            settings,
            out,
            model_name=args.model or DEFAULT_MODEL_NAME,
            restart=args.restart,
            progress=progress,
            log=bar.console.print,
        )
    console.print(f"wrote {result.path}, {result.path}.json and {result.path.with_suffix('.png')}")
    return 0
