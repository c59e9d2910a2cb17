"""Optional dependencies. `pip install dapq` brings what the library needs (torch, transformers, gguf, accelerate,
rich); the evaluation harness, the analysis suite and their figures need the `eval` extra:

    pip install "dapq[eval]"        # rouge-score, rapidfuzz, wonderwords, matplotlib

Code that uses one of those libraries imports it through `require`, so a missing extra is a one-line DapqError with
the install command instead of a traceback:

    rouge_scorer = require("rouge_score.rouge_scorer", "eval")
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import DapqError

__all__ = ["EXTRAS", "check_extra", "install_command", "require"]

#: extra -> {module to import: distribution pip installs}
EXTRAS: dict[str, dict[str, str]] = {
    "eval": {
        "rouge_score": "rouge-score",
        "rapidfuzz": "rapidfuzz",
        "wonderwords": "wonderwords",
        "matplotlib": "matplotlib",
    },
    "ray": {"ray": "ray"},  # dapq eval --ray: sweeps on a Ray cluster
}


def install_command(extra: str) -> str:
    """The command that installs an extra, e.g. `pip install "dapq[eval]"`."""
    return f'pip install "dapq[{extra}]"'


def _missing(extra: str, module: str) -> DapqError:
    top = module.split(".")[0]
    dist = EXTRAS.get(extra, {}).get(top, top)
    return DapqError(f"{dist} is not installed; it comes with dapq's {extra} extra: {install_command(extra)}")


def require(module: str, extra: str = "eval") -> ModuleType:
    """Import `module` (dotted names allowed) and return it; raise a one-line DapqError naming the install command
    of `extra` when it is not installed. An ImportError from inside an installed package is not masked."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and missing != module.split(".")[0]:
            raise  # the module is there but one of its own dependencies is broken: show the real error
        raise _missing(extra, module) from None


def check_extra(extra: str = "eval") -> None:
    """Fail fast (before a model load) when a module of `extra` is missing; imports nothing."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise _missing(extra, module)
