"""Resumable analysis runs: finished items appended to a JSON-lines file as they finish."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Checkpoint:
    """Finished items of a run (key -> JSON value), appended with flush + fsync; a torn last line is ignored."""

    def __init__(self, path: Path):
        from ..runs import check_fields, load_rows

        self.path = path
        fields = {"key": str, "value": object}
        rows = load_rows(path, check=lambda row, where: check_fields(row, where, fields))
        self.items = {row["key"]: row["value"] for row in rows}

    def save(self, key: str, value: Any) -> None:
        from ..safefile import open_append

        with open_append(self.path) as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.items[key] = value
