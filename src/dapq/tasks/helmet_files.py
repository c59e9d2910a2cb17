"""Helpers the HELMET loaders share (arXiv 2410.02694, App. B): HELMET's deterministic shuffles, finding a subset's
files under a data folder, loading a split from the hub, and the metadata every HELMET sample carries."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .longbench import import_datasets

#: the seed of every HELMET shuffle (its configs' `seed: 42`)
HELMET_SEED = 42


def sha_int(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def permutation(n: int, seed: int) -> list[int]:
    """`datasets.Dataset.shuffle(seed=seed)`'s order: numpy's default_rng(seed).permutation(n)."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def find_file(root: Path, names: list[str], hint: str, what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DapqError(f"HELMET {what}: none of {', '.join(str(root / n) for n in names)} exists. {hint}")


def hub_rows(name: str, config: str | None, split: str, hint: str) -> list[dict[str, Any]]:
    datasets = import_datasets()
    try:
        ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(name, split=split)
    except Exception as err:  # network, hub or script errors: say what to do instead
        raise DapqError(f"Could not load {name} ({split}) from the hub ({type(err).__name__}: {err}). {hint}") from None
    return [dict(r) for r in ds]


def helmet_meta(subset: str, length: int, *, prefix: str, parse: str, stop: bool, parsed_only: bool) -> dict[str, Any]:
    return {
        "subset": subset,
        "length": length,
        "stop_on_newline": stop,
        "helmet_output_prefix": prefix,
        "helmet_parse_prefix": parse,
        "helmet_parsed_only": parsed_only,
    }
