"""`dapq train-queries` and learned-queries files against hostile input (issue 27): no file runs code when loaded,
nothing outside the named folder is written, and every bad input is a one-line error (exit 2, stderr only), found
before the model loads where it can be."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from dapq import get_method
from dapq.cli import main
from dapq.errors import DapqError
from dapq.safefile import FileLock
from helpers import TinyTokenizer, build_tiny, tiny_queries_file
from test_safefile import tree_hash

TRAIN = ["--n-queries", "4", "--train", "2", "--val", "1", "--lengths", "300-400", "--answer-tokens", "3"]
TRAIN += ["--epochs", "1", "--batch", "2", "--budget", "16"]


class Evil:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """tmp/out (the folder named by --out), tmp/outside (a sentinel tree), a marker path, and a model loader that
    records whether it ran."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    (outside / "queries.pt").write_bytes(Path(tiny_queries_file()).read_bytes())
    loads: list[int] = []

    def loader(args):
        loads.append(1)
        return build_tiny("llama"), TinyTokenizer()

    import dapq.cli.train as train_cli

    monkeypatch.setattr(train_cli, "load_model_from_args", loader)
    return tmp_path, out, outside, loads


def _plant_pickle_ckpt(out: Path, outside: Path) -> list[str]:
    torch.save({"settings": Evil(str(outside / "PWNED"))}, out / "q.pt.ckpt")
    return ["--out", str(out / "q.pt")]


def _plant_raw_pickle_ckpt(out: Path, outside: Path) -> list[str]:
    (out / "q.pt.ckpt").write_bytes(pickle.dumps(Evil(str(outside / "PWNED"))))
    return ["--out", str(out / "q.pt")]


def _truncated_ckpt(out: Path, outside: Path) -> list[str]:
    buf = out / "full.ckpt"
    torch.save({"epoch": 1, "embeddings": torch.zeros(4, 64)}, buf)
    (out / "q.pt.ckpt").write_bytes(buf.read_bytes()[:100])
    buf.unlink()
    return ["--out", str(out / "q.pt")]


def _empty_ckpt(out: Path, outside: Path) -> list[str]:
    (out / "q.pt.ckpt").write_bytes(b"")
    return ["--out", str(out / "q.pt")]


def _text_ckpt(out: Path, outside: Path) -> list[str]:
    (out / "q.pt.ckpt").write_text("not a checkpoint\n")
    return ["--out", str(out / "q.pt")]


def _foreign_ckpt(out: Path, outside: Path) -> list[str]:
    torch.save({"epoch": "one"}, out / "q.pt.ckpt")
    return ["--out", str(out / "q.pt")]


def _link(name: str, target: str = "victim.txt"):
    def make(out: Path, outside: Path) -> list[str]:
        (out / name).symlink_to(outside / target)
        return ["--out", str(out / "q.pt")]

    return make


def _unrelated_out(out: Path, outside: Path) -> list[str]:
    (out / "notes.txt").write_text("my notes\n")
    return ["--out", str(out / "notes.txt")]


def _png_out(out: Path, outside: Path) -> list[str]:
    return ["--out", str(out / "q.png")]


def _under_file(out: Path, outside: Path) -> list[str]:
    (out / "file").write_text("x")
    return ["--out", str(out / "file" / "q.pt")]


def _under_proc(out: Path, outside: Path) -> list[str]:
    return ["--out", "/proc/dapq-test/q.pt"]


def _lr(value: str):
    def make(out: Path, outside: Path) -> list[str]:
        return ["--out", str(out / "q.pt"), "--lr", value]

    return make


def _opts(*extra: str):
    def make(out: Path, outside: Path) -> list[str]:
        return ["--out", str(out / "q.pt"), *extra]

    return make


def _folder_out(out: Path, outside: Path) -> list[str]:
    return ["--out", str(out)]


# (case, setup -> argv, the error's words, found before the model load?)
HOSTILE = [
    ("planted pickle checkpoint (torch zip)", _plant_pickle_ckpt, "is not a dapq training checkpoint", False),
    ("planted raw pickle checkpoint", _plant_raw_pickle_ckpt, "is not a torch file", True),
    ("truncated checkpoint", _truncated_ckpt, "is not a dapq training checkpoint", False),
    ("empty checkpoint", _empty_ckpt, "is not a dapq training checkpoint", False),
    ("text checkpoint", _text_ckpt, "is not a torch file", True),
    ("foreign checkpoint", _foreign_ckpt, "no valid 'settings'", False),
    ("queries path a symlink", _link("q.pt"), "symbolic link", True),
    ("record a symlink", _link("q.pt.json"), "symbolic link", True),
    ("plot a symlink", _link("q.png"), "symbolic link", True),
    ("checkpoint a symlink", _link("q.pt.ckpt"), "symbolic link", True),
    ("checkpoint a dangling symlink", _link("q.pt.ckpt", "later"), "symbolic link", True),
    ("lock a symlink", _link(".q.pt.lock"), "cannot be opened", True),
    ("--out an unrelated file", _unrelated_out, "will not overwrite", True),
    ("--out q.png", _png_out, "the loss plot would overwrite the queries", True),
    ("--out under a file", _under_file, "is a file, not a folder", True),
    ("--out under /proc", _under_proc, "pass a writable folder", True),
    ("--out a folder", _folder_out, "is a folder", True),
    ("--lr inf", _lr("inf"), "--lr must be a finite number", True),
    ("--lr nan", _lr("nan"), "--lr must be a finite number", True),
    ("--lr -1", _lr("-1"), "--lr must be > 0", True),
    ("--lora-rank -1", _opts("--lora-rank", "-1"), "--lora-rank must be an integer >= 0", True),
    ("--lora-modules lm_head", _opts("--lora-modules", "lm_head"), "--lora-modules must be some of", True),
    ("--lora-lr nan", _opts("--lora-lr", "nan"), "--lora-lr must be a finite number", True),
    ("--build-only with needles", _opts("--build-only", "--recipe", "needles"), "needle recipe keeps no store", True),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_train_queries_hostile(world, capsys, case):
    tmp, out, outside, loads = world
    _, setup, words, early = case
    argv = ["train-queries", *setup(out, outside), *TRAIN]
    sentinel = tree_hash(outside)
    inside = tree_hash(out)
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert "Traceback" not in captured.out + captured.err
    assert not (outside / "PWNED").exists(), "a file ran code when it was loaded"
    assert tree_hash(outside) == sentinel, "a file outside --out's folder changed"
    if early:
        assert not loads, "the error must come before the model load"
        assert tree_hash(out) == inside, "a refused run must write nothing"


def test_a_second_run_on_one_out_is_refused(world, capsys):
    tmp, out, outside, loads = world
    with FileLock(out / ".q.pt.lock", "q.pt"):
        assert main(["train-queries", "--out", str(out / "q.pt"), *TRAIN]) == 2
    assert "is being written by pid" in capsys.readouterr().err and not loads


def test_old_temporaries_as_links_are_never_written(world, capsys):
    """The names earlier versions wrote through (q.pt.tmp, q.pt.ckpt.tmp) as planted links: training succeeds and
    leaves them and their targets alone; a rerun replaces queries, record, plot and checkpoint of their own kind."""
    tmp, out, outside, loads = world
    for name in ("q.pt.tmp", "q.pt.ckpt.tmp", ".q.pt.tmp"):
        (out / name).symlink_to(outside / "victim.txt")
    sentinel = tree_hash(outside)
    assert main(["train-queries", "--out", str(out / "q.pt"), *TRAIN]) == 0
    assert main(["train-queries", "--out", str(out / "q.pt"), *TRAIN, "--restart"]) == 0
    assert tree_hash(outside) == sentinel
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            ".q.pt.lock",
            ".q.pt.tmp",
            "q.png",
            "q.pt",
            "q.pt.ckpt",
            "q.pt.ckpt.tmp",
            "q.pt.json",
            "q.pt.targets",
            "q.pt.tmp",
        ]
    )
    data = torch.load(out / "q.pt", weights_only=True)
    assert data["embeddings"].shape == (4, 64)


def test_diverged_training_is_an_error_not_a_best_epoch(world, capsys, monkeypatch):
    tmp, out, outside, loads = world
    import dapq.train.fit as fit

    monkeypatch.setattr(fit, "example_loss", lambda probs, ex, loss: probs[0].sum() * float("nan"))
    assert main(["train-queries", "--out", str(out / "q.pt"), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "Training diverged at epoch 1" in err and not (out / "q.pt").exists()


QUERIES_BAD = [
    ("empty string", lambda tmp: "", "queries= is empty"),
    ("a folder", lambda tmp: str(tmp), "is a folder"),
    ("missing", lambda tmp: str(tmp / "nope.pt"), "No learned-queries file"),
    ("raw pickle", lambda tmp: _raw_pickle(tmp), "is not a learned-queries file"),
    ("torch pickle of code", lambda tmp: _torch_pickle(tmp), "is not a learned-queries file"),
]


def _raw_pickle(tmp: Path) -> str:
    (tmp / "raw.pt").write_bytes(pickle.dumps(Evil(str(tmp / "PWNED"))))
    return str(tmp / "raw.pt")


def _torch_pickle(tmp: Path) -> str:
    torch.save({"format": "dapq-learned-queries", "embeddings": Evil(str(tmp / "PWNED"))}, tmp / "evil.pt")
    return str(tmp / "evil.pt")


@pytest.mark.parametrize("case", QUERIES_BAD, ids=[c[0] for c in QUERIES_BAD])
def test_bad_queries_files(tmp_path, recwarn, case):
    _, make, words = case
    with pytest.raises(DapqError) as info:
        get_method("learned", budget=16, queries=make(tmp_path))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert "train-queries --out" not in str(info.value) or case[0] == "missing"
    assert not (tmp_path / "PWNED").exists()
    assert not [w for w in recwarn if "torch" in str(w.filename)], "torch's warning must not reach the user"


def test_queries_accepts_a_path_and_records_the_content_hash(tmp_path):
    import hashlib

    path = Path(tiny_queries_file())
    method = get_method("learned", budget=16, queries=path)
    assert method.queries == str(path)
    assert method.queries_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert method.file_hashes() == {"queries": method.queries_sha256}


def test_a_retrained_queries_file_never_mixes_rows_in_one_run(tmp_path):
    """Retraining into the same queries= path and resuming an eval: the folder's run.json holds the old file's hash,
    so the resume is refused (or goes to a new folder with new_run), and every row names the file it used."""
    from dapq.harness.runner import MethodSpec, run
    from dapq.methods.learned import save_queries
    from dapq.runs import RunConfig, load_rows
    from helpers import toy_samples

    model = build_tiny("llama")
    queries = tmp_path / "q.pt"
    save_queries(queries, torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.2, model="tiny")
    spec = [MethodSpec.of("learned", queries=str(queries))]
    folder = tmp_path / "run"
    run(model, TinyTokenizer(), toy_samples(1), spec, [16], folder, config=RunConfig(model="tiny"))
    first = load_rows(folder / "results.jsonl")[0]["method_config"]["queries_sha256"]
    # another variant added to the folder later is fine: run.json records both files
    extra = [*spec, MethodSpec.of("learned", label="learned@tiny", queries=tiny_queries_file())]
    run(model, TinyTokenizer(), toy_samples(1), extra, [16], folder, config=RunConfig(model="tiny"))
    import json

    assert set(json.loads((folder / "run.json").read_text())["method_files"]) == {spec[0].key, "learned@tiny"}
    save_queries(queries, torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 0.2, model="tiny")
    with pytest.raises(DapqError, match="holds a run with other settings .*its file changed"):
        run(model, TinyTokenizer(), toy_samples(2), spec, [16], folder, config=RunConfig(model="tiny"))
    new = run(model, TinyTokenizer(), toy_samples(2), spec, [16], folder, config=RunConfig(model="tiny"), new_run=True)
    rows = load_rows(new)
    assert new.parent.name == "run-2" and len(rows) == 2
    assert {r["method_config"]["queries_sha256"] for r in rows} == {
        get_method("learned", queries=queries).queries_sha256
    }
    assert first not in {r["method_config"]["queries_sha256"] for r in rows}


def test_method_variants_on_the_command_line(tmp_path):
    """`--methods learned,learned@b --param learned@b.queries=...`: two variants of one method in one run, each with
    its own file, rows and hash; a name given twice or an empty label is a one-line error."""
    from dapq.cli.evaluate import method_specs
    from dapq.harness.runner import run
    from dapq.methods.learned import save_queries
    from dapq.runs import RunConfig, load_rows
    from helpers import toy_samples

    other = save_queries(tmp_path / "b.pt", torch.randn(4, 64, generator=torch.Generator().manual_seed(9)), model="t")
    specs = method_specs("learned,learned@b", [f"learned.queries={tiny_queries_file()}", f"learned@b.queries={other}"])
    assert [s.key for s in specs] == [f"learned,queries={tiny_queries_file()}", "learned@b"]
    path = run(build_tiny("llama"), TinyTokenizer(), toy_samples(1), specs, [16], tmp_path / "r", config=RunConfig("t"))
    rows = load_rows(path)
    assert {r["method_key"] for r in rows} == {s.key for s in specs}
    assert len({r["method_config"]["queries_sha256"] for r in rows}) == 2
    for names, params, words in [
        ("learned,learned", [], "names a method twice"),
        ("learned@", [], "a variant is name@label"),
        ("learned", ["learned@x.queries=q.pt"], "not in --methods"),
    ]:
        with pytest.raises(DapqError, match=words):
            method_specs(names, params)
