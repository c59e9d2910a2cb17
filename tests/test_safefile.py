"""The one safe-write path (`dapq.safefile`) against a table of hostile targets: nothing outside the named folder
changes, every refusal is a one-line DapqError, and a good write is atomic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dapq.checks import clean_label, finite
from dapq.errors import DapqError
from dapq.safefile import FileLock, check_target, ensure_dir, open_append, save_torch, write_bytes, write_json


def tree_hash(root: Path) -> str:
    """A digest of every entry under `root` (names, link targets, file bytes): equal before and after = untouched."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_symlink():
            h.update(b"L" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _symlink(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "q.pt").symlink_to(outside / "victim.txt")
    return tmp / "out" / "q.pt"


def _dangling(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "q.pt").symlink_to(outside / "not-yet.txt")
    return tmp / "out" / "q.pt"


def _folder(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "q.pt").mkdir()
    return tmp / "out" / "q.pt"


def _unrelated(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "q.pt").write_text("my notes\n")
    return tmp / "out" / "q.pt"


def _png(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "q.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    return tmp / "out" / "q.pt"


def _under_file(tmp: Path, outside: Path) -> Path:
    (tmp / "out" / "f").write_text("x")
    return tmp / "out" / "f" / "q.pt"


def _under_proc(tmp: Path, outside: Path) -> Path:
    return Path("/proc/dapq-test/q.pt")


def _fifo(tmp: Path, outside: Path) -> Path:
    os.mkfifo(tmp / "out" / "q.pt")
    return tmp / "out" / "q.pt"


HOSTILE = [
    ("symlink to a file outside", _symlink, "symbolic link"),
    ("dangling symlink", _dangling, "symbolic link"),
    ("a folder", _folder, "is a folder"),
    ("an unrelated text file", _unrelated, "will not overwrite"),
    ("a file of another kind", _png, "will not overwrite"),
    ("under a file", _under_file, "is a file, not a folder"),
    ("under /proc", _under_proc, "pass a writable folder"),
    ("a fifo", _fifo, "not a regular file"),
]


@pytest.fixture
def sandbox(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    (tmp_path / "out").mkdir()
    return tmp_path, outside


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_targets_are_refused_and_nothing_changes(sandbox, case):
    tmp, outside = sandbox
    _, make, message = case
    target = make(tmp, outside)
    before = tree_hash(tmp)
    with pytest.raises(DapqError) as info:
        save_torch(target, {"x": 1})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert tree_hash(tmp) == before  # no temporary left behind, nothing outside written
    assert (outside / "victim.txt").read_text() == "precious\n"


def test_replace_same_kind_and_leave_no_temporary(tmp_path):
    p = tmp_path / "q.pt"
    save_torch(p, {"a": 1})
    save_torch(p, {"a": 2})  # a torch file is replaced by a torch file
    import torch

    assert torch.load(p, weights_only=True) == {"a": 2}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q.pt"]
    write_json(tmp_path / "r.json", {"x": 1})
    with pytest.raises(DapqError, match="will not overwrite"):
        write_json(tmp_path / "q.pt", {"x": 1})  # a JSON write never replaces a queries file
    with pytest.raises(ValueError):  # NaN is not JSON
        write_json(tmp_path / "n.json", {"x": float("nan")})


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"v": 1})

    class Boom(Exception):
        pass

    def bad():
        raise Boom

    with pytest.raises(Boom):
        from dapq.safefile import _replacing  # the context manager under every writer

        with _replacing(p, "json") as f:
            f.write(b'{"v": 2')
            bad()
    assert p.read_text() == '{\n "v": 1\n}\n'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_append_never_follows_a_link(sandbox):
    tmp, outside = sandbox
    link = tmp / "out" / "results.jsonl"
    link.symlink_to(outside / "victim.txt")
    with pytest.raises(DapqError, match="symbolic link"):
        open_append(link)
    good = tmp / "out" / "r2.jsonl"
    with open_append(good) as f:
        f.write('{"a": 1}\n')
    assert good.read_text() == '{"a": 1}\n'


def test_write_bytes_kinds_and_ensure_dir(tmp_path):
    write_bytes(tmp_path / "a.md", b"# hi\n", "markdown")
    write_bytes(tmp_path / "a.md", b"# again\n", "markdown")  # a report replaces a report
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DapqError, match="not a markdown report"):
        write_bytes(tmp_path / "notes.txt", b"# report", "markdown")
    assert (tmp_path / "notes.txt").read_text() == "hello"
    (tmp_path / "empty.pt").write_bytes(b"")
    assert check_target(tmp_path / "empty.pt", "torch") == tmp_path / "empty.pt"  # an empty file holds nothing
    assert ensure_dir(tmp_path / "a" / "b").is_dir()


def test_file_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / ".lock"
    with FileLock(lock, "q.pt"):
        with pytest.raises(DapqError, match=f"q.pt is being written by pid {os.getpid()}"):
            with FileLock(lock, "q.pt"):
                pass
    with FileLock(lock, "q.pt"):  # released
        pass
    (tmp_path / ".lock2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DapqError, match="cannot be opened"):
        with FileLock(tmp_path / ".lock2"):
            pass


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0.01, True),
        (float("inf"), False),
        (float("nan"), False),
        (-1.0, False),
        (0, False),
        ("1", False),
        (True, False),
    ],
)
def test_finite(value, ok):
    if ok:
        assert finite("--lr", value, low=0, low_open=True) == value
    else:
        with pytest.raises(DapqError, match="--lr must be"):
            finite("--lr", value, low=0, low_open=True)


def test_clean_label_strips_control_and_bidi():
    assert clean_label("snap\x1b[2Jkv\u202e\u200d x\n\ty") == "snap[2Jkv x y"
    assert clean_label("dapq,budget=64") == "dapq,budget=64"
