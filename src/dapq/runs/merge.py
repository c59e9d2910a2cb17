"""Merge the result rows of several `dapq eval` run folders (or .jsonl / .jsonl.gz files) into one gzipped JSONL.

    from dapq.runs.merge import merge_files
    summary = merge_files(["runs/est4k-a", "runs/est4k-b"], "docs/results/estimators/ruler-4k.jsonl.gz")
    print(summary.line())

(the command line: `dapq merge runs/est4k-a runs/est4k-b --out docs/results/estimators/ruler-4k.jsonl.gz`)

Sweeps split over processes each start from a copy of the committed rows, so the same row appears in several
inputs: a row is kept once per `dapq.harness.runner.row_key` (sample, method, budget, method config), the first one
read wins. Error rows (a sample that failed on Ray) are dropped: they are not results. The gzip header carries no
time stamp and no file name, so the same rows give the same bytes.

Rows are read with `dapq.harness.runner.load_rows` (read-only, every row checked: a bad line is a one-line error that
names the file and line). A folder input is its results.jsonl and run.json.

Configurations: rows of different configurations (model, dtype, mode, seed, bench options, dapq version, ...) are
never deduplicated against each other. A row's configuration is its `config_id` (the hash of its run's settings,
`dapq.harness.runner.row_meta`); a row without one (written before rows carried it) takes its folder's run.json
settings (hashed the same way) when it comes from a run folder, else its model, mode and seed, the fields
`dapq report` groups such rows by. By default inputs that hold more than one configuration are refused with a
one-line error naming them and what differs; `keep_apart=True` keeps all of them (deduplicated within each).

The output is written once, through `dapq.safefile.write_bytes` (checked target, exclusive temporary, fsync,
rename): never through a link, never over a folder or a file of another kind, and never over one of the inputs.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..safefile import check_target, write_bytes
from .store import RESULTS, RUN_FILE, check_row, config_hash, load_rows, row_key

__all__ = [
    "MergeInput",
    "MergeResult",
    "check_out",
    "gzip_rows",
    "merge_files",
    "merge_rows",
    "parse_samples",
    "read_input",
    "row_config",
    "sample_index",
]

#: the fields that identify a row's configuration when it carries no config_id (as `dapq report` groups such rows)
LEGACY_FIELDS = ("model", "mode", "seed")
_SHOWN = 4  # configurations / inputs / differing settings named in one error line


@dataclass
class MergeInput:
    """One input as read: the path given, the files read for it, its run.json settings (a folder) and its rows."""

    path: Path
    files: list[Path]
    settings: dict[str, Any] | None
    rows: list[dict[str, Any]]


@dataclass
class MergeResult:
    """The merged rows and the counts of the summary line; `configs`: configuration -> its settings as known."""

    rows: list[dict[str, Any]]
    rows_in: int = 0
    duplicates: int = 0
    errors: int = 0
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: Path | None = None
    samples: tuple[int, int] | None = None  # the sample indices kept (`--samples`), None: every sample
    outside: int = 0  # rows dropped as outside `samples`

    def line(self) -> str:
        """The one summary line: rows in, duplicates, error rows dropped, rows out, configurations."""
        n = len(self.configs)
        outside = ""
        if self.samples is not None:
            lo, hi = self.samples
            outside = f"{self.outside} rows outside samples {lo}-{hi} dropped, "
        text = (
            f"{self.rows_in} rows in, {self.duplicates} duplicates, {self.errors} error rows dropped, {outside}"
            f"{len(self.rows)} rows out, {n} configuration{'s' if n != 1 else ''}"
        )
        return text + (f" -> {self.out}" if self.out is not None else "")


def _check_merge_row(row: Any, where: str) -> dict[str, Any]:
    """`check_row`, plus a config_id (when present) that is a non-empty string."""
    check_row(row, where)
    cid = row.get("config_id")
    if cid is not None and not (isinstance(cid, str) and cid):
        raise DapqError(f"{where}: config_id must be a non-empty string; got {cid!r}. Fix or delete that line.")
    return row


def _read_settings(run_file: Path) -> dict[str, Any]:
    try:
        settings = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
    except OSError as exc:
        raise DapqError(f"{run_file} cannot be read ({exc.strerror}): fix its permissions or move it away.") from None
    except (ValueError, KeyError, TypeError):
        raise DapqError(f"{run_file} is not a dapq run file: delete it or move it away.") from None
    if not isinstance(settings, dict):
        raise DapqError(f"{run_file} is not a dapq run file: delete it or move it away.")
    return settings


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return load_rows(path, repair=False, check=_check_merge_row)
    except OSError as exc:
        raise DapqError(f"{path} cannot be read ({exc.strerror}): pass a readable results file.") from None


def read_input(path: str | os.PathLike) -> MergeInput:
    """The rows of a run folder (its results.jsonl, with its run.json settings) or of a .jsonl / .jsonl.gz file,
    read-only; a missing input, a folder without results, or a bad line is a one-line DapqError."""
    p = Path(path)
    if not p.exists():
        raise DapqError(f"{p} does not exist: pass a `dapq eval` run folder or a .jsonl / .jsonl.gz results file.")
    if p.is_dir():
        results = p / RESULTS
        if not results.is_file():
            raise DapqError(f"{p} holds no {RESULTS}: pass a folder written by `dapq eval`, or a results file.")
        run_file = p / RUN_FILE
        settings = _read_settings(run_file) if run_file.is_file() else None
        files = [p, results] + ([run_file] if settings is not None else [])
        return MergeInput(p, files, settings, _load(results))
    if not p.is_file():
        raise DapqError(f"{p} is not a regular file or folder: pass a run folder or a results file.")
    return MergeInput(p, [p], None, _load(p))


def row_config(row: dict[str, Any], settings: dict[str, Any] | None = None) -> str:
    """The configuration a row belongs to: `config_id=<id>` from the row's config_id, else from the hash of its
    folder's run.json `settings`, else `legacy <model, mode, seed as JSON>`."""
    cid = row.get("config_id")
    if cid is None and settings is not None:
        cid = config_hash(settings)
    if cid is not None:
        return f"config_id={cid}"
    return "legacy " + json.dumps({k: row.get(k) for k in LEGACY_FIELDS}, sort_keys=True, default=str)


def _described(row: dict[str, Any], settings: dict[str, Any] | None, config: str) -> dict[str, Any]:
    """What is known of a configuration: its run.json settings when they are the row's, else what the row says."""
    if settings is not None and config == f"config_id={config_hash(settings)}":
        return {**settings, "config_id": config_hash(settings)}
    known = {k: row.get(k) for k in LEGACY_FIELDS}
    versions = row.get("versions")
    if isinstance(versions, dict) and versions.get("dapq") is not None:
        known["dapq"] = versions["dapq"]
    if row.get("config_id") is not None:
        known["config_id"] = row["config_id"]
    return known


def _short(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _name(config: str) -> str:
    if config.startswith("config_id="):
        return config
    fields = json.loads(config.split(" ", 1)[1])
    return "rows without config_id (" + ", ".join(f"{k}={fields[k]}" for k in LEGACY_FIELDS) + ")"


def _clash(configs: dict[str, dict[str, Any]], where: dict[str, list[str]]) -> DapqError:
    names = [f"{_name(c)} in {_short(where[c])}" for c in configs]
    keys = sorted({k for s in configs.values() for k in s})
    differ = []
    for k in keys:
        values = [s.get(k) for s in configs.values()]
        if any(v != values[0] for v in values):
            differ.append(f"{k} " + " / ".join(repr(v) for v in values[:_SHOWN]))
    return DapqError(
        f"the inputs hold {len(configs)} configurations: {_short(names)}; they differ in "
        f"{_short(differ) if differ else 'settings not recorded in the rows'}. Merge each configuration on its own, "
        "or pass --keep-apart to keep them all (deduplicated within each configuration)."
    )


_SAMPLE = re.compile(r"-s(\d+)(?=-|$)")


def sample_index(sample_id: str) -> int:
    """A row's sample index: the number of the last `-s<N>` part of its sample_id (`ruler-vt-L2048-s7` -> 7; with the
    default seed 0, `dapq eval --samples N` draws 0 .. N-1); an id without one is sample 0 (a NIAH cell of seed 0)."""
    found = _SAMPLE.findall(str(sample_id))
    return int(found[-1]) if found else 0


def parse_samples(text: str) -> tuple[int, int]:
    """`--samples` of `dapq merge`: 'N' -> (0, N - 1), the samples `dapq eval --samples N` draws; 'LO-HI' -> (LO, HI),
    both kept; a one-line DapqError otherwise."""
    value = str(text).strip()
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", value)
    if (
        m is None
        or (m.group(2) is None and int(m.group(1)) < 1)
        or (m.group(2) is not None and int(m.group(2)) < int(m.group(1)))
    ):
        raise DapqError(
            f"--samples takes N (the first N samples, as dapq eval --samples N) or LO-HI (sample indices, both kept, "
            f"LO <= HI), e.g. 5 or 5-9; got {text!r}."
        )
    if m.group(2) is None:
        return 0, int(m.group(1)) - 1
    return int(m.group(1)), int(m.group(2))


def merge_rows(
    inputs: Iterable[MergeInput], keep_apart: bool = False, samples: tuple[int, int] | None = None
) -> MergeResult:
    """The rows of `inputs` in reading order, error rows dropped, the first row of each (configuration, row_key)
    kept; with `samples` (LO, HI) only the rows whose `sample_index` lies in LO..HI. More than one configuration is a
    one-line DapqError unless `keep_apart`."""
    result = MergeResult(rows=[], samples=samples)
    where: dict[str, list[str]] = {}
    seen: set[tuple] = set()
    for source in inputs:
        for row in source.rows:
            result.rows_in += 1
            if row.get("error"):
                result.errors += 1
                continue
            if samples is not None and not samples[0] <= sample_index(row["sample_id"]) <= samples[1]:
                result.outside += 1
                continue
            config = row_config(row, source.settings)
            if config not in result.configs:
                result.configs[config] = _described(row, source.settings, config)
            if str(source.path) not in where.setdefault(config, []):
                where[config].append(str(source.path))
            key = (config, row_key(row["sample_id"], row["method_key"], row.get("budget"), row.get("method_config")))
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            result.rows.append(row)
    if len(result.configs) > 1 and not keep_apart:
        raise _clash(result.configs, where)
    return result


def gzip_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    """The rows as gzipped JSON lines, with no time stamp and no file name in the header: the same rows give the same
    bytes (those of scripts/merge_rows.py, which wrote the committed docs/results files)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        for row in rows:
            gz.write((json.dumps(row) + "\n").encode())
    return buf.getvalue()


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except (OSError, ValueError):
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a link loop: not one of the inputs, and check_target refuses it
        return False


def check_out(out: str | os.PathLike, inputs: Iterable[MergeInput]) -> Path:
    """`out` as a Path if merged rows may be written there: never one of the inputs (the same file, through a link
    or a hard link, or the same resolved path), and a target `dapq.safefile` accepts for a gzip file."""
    p = Path(out)
    for source in inputs:
        for f in source.files:
            if _same(p, f):
                raise DapqError(
                    f"--out {p} is the input {f}: merged rows replacing an input is data loss if anything goes wrong; "
                    "pass a new file name."
                )
    return check_target(p, "gzip")


def merge_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    keep_apart: bool = False,
    samples: tuple[int, int] | None = None,
) -> MergeResult:
    """Read `paths`, merge their rows (`merge_rows`, `samples`: keep only those sample indices) and write them to
    `out` as gzipped JSON lines (`gzip_rows`, through `dapq.safefile.write_bytes`). Nothing is written when anything
    is refused."""
    if not paths:
        raise DapqError("no inputs: pass run folders or .jsonl / .jsonl.gz results files.")
    inputs = [read_input(p) for p in paths]  # read-only: nothing is written before everything is checked
    check_out(out, inputs)
    result = merge_rows(inputs, keep_apart=keep_apart, samples=samples)
    if not result.rows:
        outside = f", {result.outside} outside --samples" if samples is not None else ""
        raise DapqError(
            f"the inputs hold no result rows ({result.rows_in} rows in, {result.errors} error rows{outside}): nothing "
            f"written to {out}."
        )
    result.out = write_bytes(out, gzip_rows(result.rows), kind="gzip")
    return result
