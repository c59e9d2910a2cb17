"""`dapq list`: the registered methods, their parameters with defaults, and the first sentence of their docstring.

Needs the method registry only: importing `dapq.methods` does not import torch (the method modules reach torch
through `dapq.lazy`), so this command stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    sub.add_parser(
        "list",
        help="list methods and their parameters",
        description="List the registered KV-eviction methods, their parameters (pass them with --param key=value) "
        "and defaults.",
    ).set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace, console: Any) -> int:
    import dataclasses

    from rich.table import Table

    from ..methods import list_methods

    table = Table(title="dapq methods (pass parameters with --param key=value)")
    table.add_column("method")
    table.add_column("parameters (defaults)")
    table.add_column("description")
    for name, cls in list_methods().items():
        params = ", ".join(
            f"{f.name}={f.default!r}"
            for f in dataclasses.fields(cls)
            if f.init and f.default is not dataclasses.MISSING
        )
        doc = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".") + "."  # the first sentence
        table.add_row(name, params, doc)
    console.print(table)
    return 0
