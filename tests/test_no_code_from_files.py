"""Nothing dapq loads can run code (issue 27): every `torch.load` in the package and its scripts passes
weights_only=True, nothing imports pickle (or its wrappers), and every file write goes through dapq.safefile."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "src" / "dapq").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# the kvpress side-by-side worker runs in kvpress's own virtualenv (no dapq there); it only writes its own output
OUTSIDE_DAPQ = {ROOT / "scripts" / "kvpress" / "kvpress_worker.py"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            # owner: the name before the dot ("torch" of torch.load), "?" for an expression, "" for a bare name
            owner = (f.value.id if isinstance(f.value, ast.Name) else "?") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_unpickling(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & UNPICKLERS, f"{path}:{node.lineno} imports pickle"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in UNPICKLERS, f"{path}:{node.lineno} imports {node.module}"
    for node, owner, name in _calls(tree):
        if name == "load" and owner == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in kw and _is_true(kw["weights_only"]), (
                f"{path}:{node.lineno}: torch.load without weights_only=True"
            )


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_every_write_goes_through_safefile(path):
    """No `write_text`/`write_bytes`/`savefig`/`torch.save`/`save_file` and no `open(..., "w"/"a")` outside
    dapq.safefile (and the kvpress worker, which runs outside dapq)."""
    if path.name == "safefile.py" or path in OUTSIDE_DAPQ:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node, owner, name in _calls(tree):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        assert name not in ("write_text", "write_bytes") or owner in ("safefile", ""), where
        assert name != "savefig", f"{where}: save figures with dapq.safefile.save_figure"
        assert not (owner == "torch" and name == "save"), f"{where}: use dapq.safefile.save_torch"
        if name == "open" and owner in ("", "io", "gzip", "os"):
            modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
            for m in modes:
                if isinstance(m, ast.Constant) and isinstance(m.value, str):
                    assert not set(m.value) & set("wax+"), f"{where}: open(..., {m.value!r}) writes outside safefile"


OUTSIDE = re.compile(r"\.\./shared|shared/(paper|specs|design)|/work/|/check/|\.library")


ALL_PY = sorted({*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "tests").glob("*.py")})


@pytest.mark.parametrize("path", ALL_PY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_docstring_or_comment_cites_a_path_outside_the_repository(path):
    """A reader of the package cannot open files outside it: cite papers (arXiv id, section), not paths."""
    if path.name == "test_no_code_from_files.py":
        return
    lines = enumerate(path.read_text().splitlines(), 1)
    hits = [f"{path}:{n}: {line.strip()}" for n, line in lines if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
