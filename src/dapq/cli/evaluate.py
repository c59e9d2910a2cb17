"""`dapq eval <benchmark>`: the evaluation harness (`dapq.harness.runner`), resumable; one command per task family
that has command-line options (`dapq.tasks`: niah, ruler, unseen, longbench, longbench-v2, helmet, and families
registered by other packages).

    dapq eval niah --methods full,snapkv,dapq --budgets 64,128,256 --lengths 1000-4000:500 --depths 10
    dapq eval ruler --tasks all --lengths 2048,4096 --samples 50 --methods full,snapkv,dapq --budgets 128,256
    dapq eval niah --prompt-style kvcache-factory --methods full,laq_reference,laq++_reference --budgets 128

Samples come from the task registry (`dapq.tasks`). Methods, budgets, `--param` and task names are checked
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
#: samples, such as --samples, --lengths or --tasks, may change between reruns of one run); each family adds its own
#: (`Family.row_settings`)
ROW_SETTINGS = ("max_prompt_tokens",)


def add_parser(sub: Any) -> None:
    from ..tasks import families

    evaluable = families(evaluable=True)
    ev = sub.add_parser(
        "eval",
        help=f"benchmarks: {', '.join(f.name for f in evaluable)} (resumable)",
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
    for family in evaluable:  # each family adds its own options
        p = bench.add_parser(family.name, parents=[common], help=family.help)
        if family.add_options is not None:
            family.add_options(p)
    ev.set_defaults(func=cmd_eval)


def method_specs(names: str, params: list[str]) -> list[Any]:
    """`--methods` and `--param method.key=value` -> the runner's MethodSpecs (unknown --param methods rejected).

    A variant is `name@label` (`--methods learned,learned@generic --param learned@generic.queries=g.pt`): the same
    method with its own parameters, reported under the key `name@label`; `--param name.key=...` applies to the plain
    `name` only."""
    from ..harness.runner import MethodSpec

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


def specs_for_model(args: argparse.Namespace, specs: list[Any]) -> list[Any]:
    """`specs` with the parameters their methods take from --model's config (`MethodSpec.for_model`), read without
    the weights, and only when a method takes any: so run.json and the resume check, before the model load, record
    the files that will run. (The runner resolves again with the loaded model; Ray's driver with a worker's.)"""
    from .. import models
    from ..harness.runner import for_model
    from ..methods.base import Method, method_class

    if all(method_class(s.name).model_defaults.__func__ is Method.model_defaults.__func__ for s in specs):
        return specs
    config = models.load_config(args.model, cache_dir=getattr(args, "cache_dir", None))
    return specs if config is None else for_model(specs, config)


def eval_plan(args: argparse.Namespace) -> tuple[list[str], Any]:
    """The task names and TaskArgs of an `eval` command line, checked by the benchmark's family (no model, no data
    read)."""
    from ..tasks import get_family

    family = get_family(args.bench)
    if family.plan is None:
        raise DapqError(f"{args.bench} is not a `dapq eval` benchmark.")
    return family.plan(args)


def eval_samples(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The samples of an `eval` command line. An interleaved family (RULER) gives sample i of every (length, task)
    before sample i + 1, so a stopped run is balanced; the other benchmarks go task by task."""
    from ..tasks import get_family, task_samples
    from ..tasks.sample import round_robin

    names, task_args = eval_plan(args)
    if get_family(args.bench).interleave:
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
    from ..runs import RunConfig
    from ..tasks import get_family

    settings = ROW_SETTINGS + get_family(bench).row_settings
    extra = {"bench": bench, **{k: getattr(args, k) for k in settings if getattr(args, k, None) is not None}}
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
    from ..extras import check_extra
    from ..harness.runner import run, with_method_files
    from ..runs import open_run

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
    specs = specs_for_model(args, specs)  # e.g. `learned`: the queries dapq ships for --model
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
        from ..harness.ray_cluster import split_address

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
    from ..harness.ray_cluster import ray_module, ray_session
    from ..harness.scheduler import WorkerSpec, run_ray

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
