"""`dapq eval niah|ruler|longbench|longbench-v2|helmet`: the evaluation harness (`dapq.bench.runner`), resumable.

    dapq eval niah --methods full,snapkv,dapq --budgets 64,128,256 --lengths 1000-4000:500 --depths 10
    dapq eval ruler --tasks all --lengths 2048,4096 --samples 50 --methods full,snapkv,dapq --budgets 128,256
    dapq eval niah --prompt-style kvcache-factory --methods full,laq_reference,laq++_reference --budgets 128

Samples come from the task registry (`dapq.bench.tasks`). Methods, budgets, `--param` and task names are checked
before the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..checks import finite
from ..errors import DapqError
from .args import (
    DEFAULT_MODEL_NAME,
    MODES,
    add_model_options,
    check_model_options,
    check_positive,
    load_model_from_args,
    parse_budgets,
    parse_lengths,
    parse_method_params,
    parse_names,
    run_dir,
)

#: options that do not change results, left out of the hash that names the output folder
NOT_HASHED = ("func", "out", "command", "device", "attn", "new_run")  # and args.UNHASHED_EVERYWHERE
#: upper bounds of the Ray options (beyond them a typo, not a cluster)
MAX_WORKERS = 4096
MAX_THREADS_PER_WORKER = 1024
MAX_GPUS_PER_WORKER = 64
#: options that change rows without changing sample ids: recorded in run.json, a rerun must match them (what selects
#: samples, such as --samples, --lengths or --tasks, may change between reruns of one run)
ROW_SETTINGS = ("max_prompt_tokens", "data_dir", "data_file", "from_hub", "length", "prompt_style")
#: NIAH's default prompt style: left out of the folder hash and of run.json, so runs from before the option resume
DEFAULT_PROMPT_STYLE = "kamradt"


def add_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="benchmarks: niah, ruler, unseen, longbench, longbench-v2, helmet (resumable)",
        description="Evaluate methods x budgets on a benchmark: one prefill per sample for all methods, one JSON "
        "line per (sample, method, budget) in runs/<bench>-<config hash>/ (a rerun resumes).",
    )
    bench = ev.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--methods", default="full,snapkv,dapq", help="comma-separated method names (see `dapq list`)")
    common.add_argument("--budgets", default="128", help="comma-separated budgets (tokens, or ratios < 1); default 128")
    common.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method parameter, e.g. dapq.n_pseudo_tokens=16 (repeatable)",
    )
    common.add_argument(
        "--mode",
        choices=MODES,
        default="query_aware",
        help="query_aware (default): compress context and question; question_agnostic: the context only",
    )
    common.add_argument("--samples", type=int, default=None, help="samples per task (default: all / 50 for RULER)")
    common.add_argument("--seed", type=int, default=0, help="seed of the generated tasks (default 0)")
    common.add_argument(
        "--out", default=None, help="output folder (default: runs/<bench>-<config hash>; reruns resume)"
    )
    common.add_argument(
        "--new-run",
        action="store_true",
        help="if --out holds a run with other settings, write a new folder beside it (<out>-2, ...) instead of "
        "refusing",
    )
    add_model_options(common)
    common.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the sweep on Ray workers: no ADDRESS starts a local Ray instance, `auto` joins the running "
        'cluster, or give a cluster address HOST:PORT (needs pip install "dapq[ray]")',
    )
    # the three below hold the text typed (like every option); `ray_options` checks them before anything starts
    common.add_argument(
        "--workers", default=None, metavar="N", help="with --ray: Ray workers, one model each (default 2)"
    )
    common.add_argument(
        "--gpus-per-worker",
        default=None,
        metavar="G",
        help="with --ray: GPUs per worker, 0, a fraction such as 0.5 or a whole number (default 1 when the cluster "
        "has GPUs, else 0)",
    )
    common.add_argument(
        "--threads-per-worker",
        default=None,
        metavar="T",
        help="with --ray: CPUs (torch threads) per worker (default 1)",
    )
    common.add_argument("--max-prompt-tokens", type=int, default=None, help="truncate real-data prompts (head + tail)")
    p = bench.add_parser("niah", parents=[common], help="Kamradt needle in a haystack (Paul Graham essays)")
    p.add_argument("--lengths", default="1000-4000:500", help="prompt lengths: start-stop:step or a list (1k,2k)")
    p.add_argument("--depths", type=int, default=10, help="number of depths, round(linspace(0, 100, n))")
    p.add_argument(
        "--prompt-style",
        default=argparse.SUPPRESS,
        help="kamradt (default: chat template, word recall) or kvcache-factory (the LAQ / KVCache-Factory needle "
        "script: raw text, 30 tokens, stop at a newline, ROUGE-1 x 10)",
    )
    p = bench.add_parser("ruler", parents=[common], help="the RULER synthetic tasks, generated offline")
    p.add_argument(
        "--tasks",
        default="all",
        help="all (the 11 synthetic tasks) or comma-separated names, e.g. niah_single_1,vt,cwe; qa_1, qa_2 need "
        "--data-dir",
    )
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths: a list (2048,4096 or 2k,4k) or a range")
    p.add_argument("--data-dir", default=None, help="folder with SQuAD/HotpotQA files for qa_1/qa_2")
    p = bench.add_parser(
        "unseen",
        parents=[common],
        help="the unseen-kinds set: names, codes, dates, two-sentence facts in Python's docs",
    )
    p.add_argument("--kinds", default="all", help="all (name, code, date, twofact) or comma-separated kinds")
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths: a list (2048,4096 or 2k,4k) or a range")
    p = bench.add_parser("longbench", parents=[common], help="LongBench v1 English subsets from local files")
    p.add_argument("--data-dir", default=None, help="folder with the subsets' .jsonl files (LongBench's data.zip)")
    p.add_argument("--subsets", default="all", help="all (the 13 English subsets) or comma-separated names")
    p.add_argument("--from-hub", action="store_true", help="download THUDM/LongBench (needs network and `datasets`)")
    p = bench.add_parser("longbench-v2", parents=[common], help="LongBench v2 from a local file")
    p.add_argument("--data-file", required=True, help="THUDM/LongBench-v2's data.json")
    p = bench.add_parser("helmet", parents=[common], help="HELMET subsets from local files")
    p.add_argument("--data-dir", default=None, help="HELMET's data/ folder")
    p.add_argument("--subsets", default="all", help="all (the 11 subsets of the paper) or comma-separated names")
    p.add_argument("--length", type=int, default=8192, help="HELMET input length (picks RAG files, ICL shots)")
    p.add_argument("--from-hub", action="store_true", help="download from the hub (needs network and `datasets`)")
    ev.set_defaults(func=cmd_eval)


def method_specs(names: str, params: list[str]) -> list[Any]:
    """`--methods` and `--param method.key=value` -> the runner's MethodSpecs (unknown --param methods rejected).

    A variant is `name@label` (`--methods learned,learned@generic --param learned@generic.queries=g.pt`): the same
    method with its own parameters, reported under the key `name@label`; `--param name.key=...` applies to the plain
    `name` only."""
    from ..bench.runner import MethodSpec

    per_method = parse_method_params(params)
    specs = []
    for entry in parse_names(names, "--methods"):
        name, at, label = entry.partition("@")
        if at and not label.strip():
            raise DapqError(f"--methods {entry}: a variant is name@label (e.g. learned@generic).")
        specs.append(MethodSpec.of(name, label=entry if at else "", **per_method.get(entry, {})))
    keys = [s.key if "@" in s.key else s.name for s in specs]
    if len(set(keys)) < len(keys):
        raise DapqError("--methods names a method twice: give variants their own labels (name@label).")
    unknown = set(per_method) - set(keys)
    if unknown:
        raise DapqError(f"--param names method(s) not in --methods: {', '.join(sorted(unknown))}")
    return specs


def eval_plan(args: argparse.Namespace) -> tuple[list[str], Any]:
    """The task names and TaskArgs of an `eval` command line, checked (no model, no data read)."""
    from ..bench.tasks import TaskArgs, select_tasks

    if args.bench == "niah":
        style = prompt_style(args)
        return ["niah"], TaskArgs(
            lengths=parse_lengths(args.lengths), n=args.depths, seed=args.seed, prompt_style=style
        )
    if args.bench == "ruler":
        names = select_tasks("ruler", args.tasks)
        lengths = parse_lengths(args.lengths)
        return names, TaskArgs(lengths=lengths, n=args.samples, seed=args.seed, data_dir=args.data_dir)
    if args.bench == "unseen":
        names = select_tasks("unseen", args.kinds)
        return names, TaskArgs(lengths=parse_lengths(args.lengths), n=args.samples, seed=args.seed)
    loaded = {"n": args.samples, "max_prompt_tokens": args.max_prompt_tokens}
    if args.bench == "longbench":
        names = select_tasks("longbench", args.subsets)
        return names, TaskArgs(data_dir=args.data_dir, from_hub=args.from_hub, **loaded)
    if args.bench == "longbench-v2":
        return ["longbench-v2"], TaskArgs(data_file=args.data_file, **loaded)
    if args.bench == "helmet":
        names = select_tasks("helmet", args.subsets)
        return names, TaskArgs(lengths=(args.length,), data_dir=args.data_dir, from_hub=args.from_hub, **loaded)
    raise DapqError(f"Unknown benchmark {args.bench!r}; choose niah, ruler, longbench, longbench-v2 or helmet.")


def prompt_style(args: argparse.Namespace) -> str:
    """`--prompt-style`, checked; the default is dropped from `args` so that it changes neither the folder hash nor
    run.json (a kamradt run keeps the folder and settings it had before the option existed)."""
    from ..bench.niah import PROMPT_STYLES

    style = getattr(args, "prompt_style", DEFAULT_PROMPT_STYLE)
    if style not in PROMPT_STYLES:
        raise DapqError(f"--prompt-style takes {' or '.join(PROMPT_STYLES)}; got {style!r}.")
    if style == DEFAULT_PROMPT_STYLE and hasattr(args, "prompt_style"):
        del args.prompt_style
    return style


def eval_samples(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The samples of an `eval` command line. RULER is interleaved: sample i of every (length, task) before sample
    i + 1, so a stopped run is balanced; the other benchmarks go task by task."""
    from ..bench.base import round_robin
    from ..bench.tasks import task_samples

    names, task_args = eval_plan(args)
    if args.bench == "ruler":
        groups = [
            task_samples(tokenizer, name, dataclasses.replace(task_args, lengths=(length,)))
            for length in task_args.lengths
            for name in names
        ]
        return round_robin(groups)
    return [s for name in names for s in task_samples(tokenizer, name, task_args)]


def run_config(args: argparse.Namespace, bench: str) -> Any:
    """The RunConfig of a command line: model (with its fingerprint), mode, seed and the options that change rows."""
    from .. import models
    from ..bench.runner import RunConfig

    extra = {"bench": bench, **{k: getattr(args, k) for k in ROW_SETTINGS if getattr(args, k, None) is not None}}
    return RunConfig(
        model=args.model or DEFAULT_MODEL_NAME,
        model_id=models.model_fingerprint(args.model),
        dtype=str(models.resolve_dtype(args.dtype)).replace("torch.", "") if args.dtype not in (None, "auto") else None,
        attn=args.attn,
        mode=args.mode,
        seed=args.seed,
        extra=extra,
    )


def cmd_eval(args: argparse.Namespace, console: Any) -> int:
    from ..bench.runner import open_run, run, with_method_files
    from ..extras import check_extra

    on_ray = ray_options(args)  # --ray and its options: before anything else starts
    check_extra("eval")
    specs = method_specs(args.methods, args.param)
    budgets = parse_budgets(args.budgets)
    for spec in specs:  # fail fast on bad methods/budgets, before the model load
        for b in budgets if spec.uses_budget else [None]:
            spec.build(b)
    eval_plan(args)  # and on bad task names and lengths
    check_positive(args.samples, "--samples")
    check_positive(args.max_prompt_tokens, "--max-prompt-tokens")
    check_model_options(args)
    out = run_dir(args, args.bench, NOT_HASHED)
    config = with_method_files(run_config(args, args.bench), specs, budgets)  # learned queries' hashes: run.json
    out = open_run(out, config, new_run=args.new_run, check_only=True)  # a settings clash, before the model load
    if on_ray is not None:
        return eval_on_ray(args, on_ray, specs, budgets, out, config, console)
    model, tok = load_model_from_args(args)
    samples = eval_samples(args, tok)
    console.print(f"{len(samples)} samples x {len(specs)} methods -> {out}")
    path = run(model, tok, samples, specs, budgets, out, config=config, console=console, new_run=args.new_run)
    console.print(f"results: {path}   tables and figures: dapq report {path.parent}")
    return 0


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """--ray and its options, checked: `address` None is a local instance; `gpus` None is 1 per worker when the
    cluster has GPUs, else 0."""

    address: str | None
    workers: int = 2
    threads: int = 1
    gpus: float | None = None


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The Ray options of a command line (None without --ray), each a finite number in range, or a one-line
    DapqError: nothing has started yet."""
    workers = count_option(args.workers, "--workers", MAX_WORKERS)
    threads = count_option(args.threads_per_worker, "--threads-per-worker", MAX_THREADS_PER_WORKER)
    gpus = gpus_option(args.gpus_per_worker)
    if args.ray is None:
        if workers is not None or threads is not None or gpus is not None:
            raise DapqError("--workers, --gpus-per-worker and --threads-per-worker go with --ray.")
        return None
    address = str(args.ray).strip()
    if address not in ("local", "auto"):
        from ..bench.distributed import split_address

        split_address(address)  # HOST:PORT, before anything starts
    return RayOptions(
        address=None if address == "local" else address,
        workers=2 if workers is None else workers,
        threads=1 if threads is None else threads,
        gpus=gpus,
    )


def number_option(text: str, option: str) -> int | float:
    """An option's text -> an int (as typed, so errors show it) or a float (nan and inf included: `finite` refuses
    them), or a one-line DapqError."""
    t = str(text).strip()
    try:
        value = int(t)
        return value if abs(value) < 10**300 else float("inf")  # float() of a huge int would raise
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise DapqError(f"{option} must be a number; got {text!r}.") from None


def count_option(text: str | None, option: str, high: int) -> int | None:
    """An integer option's text -> an int in [1, high] (None when not given), or a one-line DapqError."""
    if text is None:
        return None
    value = finite(option, number_option(text, option), low=1, high=high)
    if not value.is_integer():  # 1.5
        raise DapqError(f"{option} must be a whole number; got {text!r}.")
    return int(value)


def gpus_option(text: str | None) -> float | None:
    """--gpus-per-worker's text -> 0, a fraction of one GPU (Ray's resolution: 0.0001) or a whole number of GPUs up
    to MAX_GPUS_PER_WORKER (None when not given), or a one-line DapqError."""
    if text is None:
        return None
    option = "--gpus-per-worker"
    value = finite(option, number_option(text, option), low=0, high=MAX_GPUS_PER_WORKER)
    if 0 < value < 1e-4 or (value > 1 and not value.is_integer()):
        raise DapqError(
            f"{option} takes 0, a fraction of one GPU (e.g. 0.5, at least 0.0001) or a whole number of "
            f"GPUs; got {text!r}."
        )
    return value


def eval_on_ray(
    args: argparse.Namespace, opts: RayOptions, specs: list, budgets: list, out: Any, config: Any, console: Any
) -> int:
    """`dapq eval ... --ray`: Ray is started (or joined) and checked first (an address where nothing answers,
    workers the cluster cannot hold: one-line errors, with Ray shut down), then the driver builds the samples with
    the tokenizer only; each worker loads the model."""
    from .. import models
    from ..bench.distributed import WorkerSpec, ray_module, ray_session, run_ray

    ray_module()  # not installed: the install command, before anything loads
    spec = WorkerSpec(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        attn=args.attn,
        cache_dir=args.cache_dir,
        threads=opts.threads,
    )
    with ray_session(opts.address, workers=opts.workers, threads=opts.threads, gpus_per_worker=opts.gpus) as gpus:
        tok = models.load_tokenizer(args.model, cache_dir=args.cache_dir)
        samples = eval_samples(args, tok)
        where = "a local Ray instance" if opts.address is None else f"Ray at {opts.address}"
        console.print(f"{len(samples)} samples x {len(specs)} methods on {opts.workers} worker(s), {where} -> {out}")
        summary = run_ray(
            spec,
            samples,
            specs,
            budgets,
            out,
            config=config,
            address=opts.address,
            workers=opts.workers,
            gpus_per_worker=gpus,
            console=console,
            new_run=args.new_run,
        )
    console.print(f"results: {summary.path}   tables and figures: dapq report {summary.path.parent}")
    return 0
