"""Optional dependencies: a missing `eval` extra is a one-line DapqError with the install command, from one helper."""

from __future__ import annotations

import sys

import pytest

from dapq import extras
from dapq.errors import DapqError


def test_require_returns_the_module():
    import json

    assert extras.require("json") is json
    assert extras.require("os.path") is sys.modules["os.path"], "dotted names"


def test_missing_module_names_the_extra_and_its_install_command():
    with pytest.raises(DapqError) as err:
        extras.require("dapq_no_such_module_xyz", "eval")
    msg = str(err.value)
    assert 'pip install "dapq[eval]"' in msg and "\n" not in msg, msg


def test_a_broken_installed_package_is_not_masked(tmp_path, monkeypatch):
    pkg = tmp_path / "dapq_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import dapq_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="dapq_missing_dependency_xyz"):
        extras.require("dapq_broken_pkg", "eval")


def test_check_extra_imports_nothing_and_fails_fast(monkeypatch):
    extras.check_extra("eval")  # the test environment has the extra (README: pip install -e ".[dev,eval]")
    monkeypatch.setitem(extras.EXTRAS, "eval", {**extras.EXTRAS["eval"], "dapq_no_such_module_xyz": "nope-dist"})
    with pytest.raises(DapqError, match=r'nope-dist is not installed.*pip install "dapq\[eval\]"'):
        extras.check_extra("eval")


def test_metrics_without_rouge_score_say_how_to_install_it(monkeypatch):
    from dapq.tasks import metrics

    metrics._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    try:
        with pytest.raises(DapqError, match=r'rouge-score is not installed.*pip install "dapq\[eval\]"'):
            metrics.rouge1("a b", ["a b"], {})
    finally:
        metrics._rouge_scorer.cache_clear()


def test_eval_ray_without_ray_gives_the_install_command(monkeypatch, capsys):
    from dapq.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["eval", "niah", "--ray", "--lengths", "1000", "--depths", "1", "--methods", "full"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "dapq[ray]"' in err and len(err.strip().splitlines()) == 1


def test_ray_options_need_ray(capsys):
    from dapq.cli import main

    assert main(["eval", "niah", "--workers", "2", "--lengths", "1000", "--depths", "1", "--methods", "full"]) == 2
    assert "go with --ray" in capsys.readouterr().err
