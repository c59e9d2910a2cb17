"""Run folders: what identifies a run (RunConfig and its run.json), the lock, row keys, and reading and appending
result rows. No model code and no torch: `dapq report`, `dapq merge` and scripts read runs through this module.

    from dapq.runs import load_rows, open_run, RunConfig
    rows = load_rows(Path("docs/results/front/ruler-2k.jsonl.gz"))   # .jsonl or .jsonl.gz

A run folder holds one configuration (run.json: model and its fingerprint, dtype, device, attention, mode, seed, the
bench options that change rows, and the hashes of the files methods read) and its rows (results.jsonl, one JSON
object per (sample, method, budget)). Rows are appended with flush + fsync; a torn last line (a run killed
mid-write) is cut off on the next read, so a resumed run neither loses nor duplicates rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import finite
from ..errors import DapqError
from ..safefile import FileLock, ensure_dir, truncate, write_json

RESULTS = "results.jsonl"


@dataclass
class RunConfig:
    """Everything besides the method and budget that changes a row. A run folder holds one configuration."""

    model: str
    mode: str = "query_aware"
    seed: int = 0
    # methods (caches of similar length, padded) decode together, up to this many rows (32: on CPU BLAS, 16+ rows take
    # a faster GEMM kernel than 2-15, see docs/results/efficiency.md)
    decode_batch: int = 32
    batch_lookahead: bool = True  # LAQ's lookahead tokens of every budget decode as one batch (`derive_many`)
    extra: dict[str, Any] = field(default_factory=dict)  # bench arguments: task options, prompt options, ...
    model_id: str = ""  # what identifies the weights (models.model_fingerprint): file hash or revision
    dtype: str | None = None  # None: not known yet (`run` fills dtype, device and attn from the loaded model)
    device: str | None = None  # device type: cpu, cuda, ...
    attn: str | None = None  # the attention implementation under the hook
    # {method key: {parameter: sha256}} of the files the methods read (`with_method_files`): kept in run.json beside
    # the settings and checked per method key, so adding a method later is fine and a changed file is refused
    method_files: dict[str, dict[str, str]] = field(default_factory=dict)

    def with_model(self, model: Any) -> RunConfig:
        """The config with dtype, device type and attention implementation read from the loaded model."""
        param = next(model.parameters())
        impl = getattr(model.config, "_attn_implementation", None)
        return dataclasses.replace(
            self, dtype=str(param.dtype).replace("torch.", ""), device=param.device.type, attn=impl
        )

    def settings(self) -> dict[str, Any]:
        """The run's configuration as recorded in run.json (JSON-able, sorted keys)."""
        from .. import __version__

        base = {
            "model": self.model,
            "model_id": self.model_id or self.model,
            "dtype": self.dtype,
            "device": self.device,
            "attn": self.attn,
            "mode": self.mode,
            "seed": self.seed,
            "decode_batch": self.decode_batch,
            "batch_lookahead": self.batch_lookahead,
            "dapq": __version__,
        }
        return json.loads(json.dumps({**base, **{f"bench.{k}": v for k, v in self.extra.items()}}, default=str))


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able run config (names the output folder)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


RUN_FILE = "run.json"
LOCK_FILE = ".lock"
ROW_FIELDS = {"sample_id": str, "task": str, "method_key": str, "score": (int, float)}


def row_key(sample_id: str, method_key: str, budget: Any, method_config: dict[str, Any] | None = None) -> tuple:
    """What identifies a row inside one run folder (whose configuration is fixed by run.json)."""
    cfg = json.dumps(method_config, sort_keys=True, default=str) if method_config is not None else ""
    return (sample_id, method_key, json.dumps(budget), cfg)


def done_keys(path: Path) -> set[tuple]:
    """The row keys already in a results file (its torn last line cut off): what a resumed run skips."""
    return {row_key(r["sample_id"], r["method_key"], r["budget"], r.get("method_config")) for r in load_rows(path)}


def check_fields(row: Any, where: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON object with every field of `fields` (name -> type, `object` for any value; a bool is not a number),
    else a one-line DapqError naming `where`."""
    if not isinstance(row, dict):
        raise DapqError(f"{where}: a results row must be a JSON object; got {type(row).__name__}.")
    for name, kind in fields.items():
        value = row.get(name)
        numeric = kind in (int, float, (int, float))
        if name not in row or not isinstance(value, kind) or (numeric and isinstance(value, bool)):
            raise DapqError(f"{where}: row has no valid {name!r}; fix or delete that line.")
    return row


def check_row(row: Any, where: str) -> dict[str, Any]:
    """A results row with the fields reports and resumes rely on, else a one-line DapqError naming `where`."""
    check_fields(row, where, ROW_FIELDS)
    finite("score", row["score"], what=f"{where}: the row's")
    if not isinstance(row.get("metadata", {}), dict):
        raise DapqError(f"{where}: metadata must be a JSON object; fix or delete that line.")
    budget = row.get("budget")
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, (int, float))):
        raise DapqError(f"{where}: budget must be a number or null; got {budget!r}. Fix or delete that line.")
    return row


def load_rows(
    path: Path, *, repair: bool = True, check: Callable[[Any, str], dict[str, Any]] = check_row
) -> list[dict[str, Any]]:
    """All complete rows of a JSON-lines file (or a gzipped one, `.gz`, read-only); a torn last line (a run killed
    mid-write) is cut off the file when `repair` (else ignored). A line that `check` refuses (default: not a
    results row) is a DapqError naming the file and line; so is a torn or foreign .gz file."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise DapqError(f"{path} is not a file.")
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        data = _gunzip(path, data)
        repair = False  # a compressed file is never rewritten in place
    good_end = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
    rows = []
    for lineno, line in enumerate(data[:good_end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = getattr(exc, "msg", "not UTF-8")
            raise DapqError(f"{path}:{lineno}: not a JSON row ({msg}); fix or delete that line.") from None
        rows.append(check(row, f"{path}:{lineno}"))
    if good_end != len(data) and repair:
        truncate(path, good_end)
    return rows


def _gunzip(path: Path, data: bytes) -> bytes:
    import gzip
    import zlib

    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # torn, truncated, or not gzip at all
        raise DapqError(f"{path} is not a complete gzip file ({exc}): copy it again or delete it.") from None


def _differences(recorded: dict[str, Any], settings: dict[str, Any], partial: bool = False) -> list[str]:
    keys = sorted(set(recorded) | set(settings))
    if partial:  # a check before the model load: settings still None are not known yet
        keys = [k for k in keys if settings.get(k) is not None]
    return [
        f"{k}: folder {recorded.get(k)!r}, this run {settings.get(k)!r}"
        for k in keys
        if recorded.get(k) != settings.get(k)
    ]


def legacy_settings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings a folder written before run.json existed can be checked against (from its rows)."""
    first = rows[0]
    out = {k: first.get(k) for k in ("model", "mode", "seed")}
    out["dapq"] = (first.get("versions") or {}).get("dapq")
    return out


def open_run(out_dir: str | Path, config: RunConfig, *, new_run: bool = False, check_only: bool = False) -> Path:
    """The run folder for `config`: created with its run.json, or an existing one written with the same settings.

    A folder written with other settings is refused with a one-line error that says which setting differs; with
    `new_run=True` the run goes to a new folder beside it (`<name>-2`, `<name>-3`, ...) instead. `check_only`:
    return the folder the run will use, create nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DapqError(f"--out {out} is an existing file: pass a folder.")
    settings = config.settings()
    candidate, n = out, 1
    while True:
        problem = _folder_mismatch(candidate, settings, partial=check_only) or _files_mismatch(candidate, config)
        if problem is None:
            break
        if not new_run:
            raise DapqError(
                f"{candidate} holds a run with other settings ({problem}). Use another --out, or --new-run to write a "
                "new folder beside it."
            )
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    if check_only:
        return candidate
    ensure_dir(candidate)
    run_file = candidate / RUN_FILE
    recorded = _recorded_files(candidate)
    if not run_file.exists() or any(k not in recorded for k in config.method_files):
        record = {"settings": settings, "method_files": {**recorded, **config.method_files}}
        write_json(run_file, record, indent=2, sort_keys=True)
    return candidate


def _recorded_files(folder: Path) -> dict[str, dict[str, str]]:
    try:
        files = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("method_files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _files_mismatch(folder: Path, config: RunConfig) -> str | None:
    """The method keys whose files differ from the ones the folder's rows were made with (None: none)."""
    recorded = _recorded_files(folder)
    changed = [k for k, files in config.method_files.items() if k in recorded and recorded[k] != files]
    if not changed:
        return None
    return "; ".join(
        f"{k}: its file changed since the folder's rows were written (sha256 {recorded[k]} -> {config.method_files[k]})"
        for k in changed
    )


def _folder_mismatch(folder: Path, settings: dict[str, Any], partial: bool = False) -> str | None:
    run_file = folder / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
        except (ValueError, KeyError, TypeError):
            raise DapqError(f"{run_file} is not a dapq run file: delete it or use another --out.") from None
        diff = _differences(recorded, settings, partial)
        return "; ".join(diff) if diff else None
    rows = load_rows(folder / RESULTS) if (folder / RESULTS).is_file() else []
    if not rows:
        return None
    recorded = legacy_settings(rows)
    diff = _differences(recorded, {k: settings.get(k) for k in recorded})
    return "; ".join(diff) if diff else None


class RunLock(FileLock):
    """An exclusive lock on a run folder (`.lock`, flock): a second process writing the same run is refused."""

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / LOCK_FILE, str(folder))


def append_row(f: Any, row: dict[str, Any]) -> None:
    """One row, flushed and fsynced: a row on disk is a row done."""
    f.write(json.dumps(row, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())
