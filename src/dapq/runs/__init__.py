"""Run folders and their rows (`store`), and merging rows of several runs (`merge`, the `dapq merge` command).
Nothing here imports torch or the engine."""

from .store import (
    LOCK_FILE,
    RESULTS,
    ROW_FIELDS,
    RUN_FILE,
    RunConfig,
    RunLock,
    append_row,
    check_fields,
    check_row,
    config_hash,
    done_keys,
    legacy_settings,
    load_rows,
    open_run,
    row_key,
)

__all__ = [
    "LOCK_FILE",
    "RESULTS",
    "ROW_FIELDS",
    "RUN_FILE",
    "RunConfig",
    "RunLock",
    "append_row",
    "check_fields",
    "check_row",
    "config_hash",
    "done_keys",
    "legacy_settings",
    "load_rows",
    "open_run",
    "row_key",
]
