"""Checks on untrusted values: numbers that must be finite and in range, labels that must be safe to print.

    finite("--lr", 0.01, low=0, low_open=True)   # 0.01, or a one-line DapqError
    clean_label("snap\x1b[2Jkv\u202e")            # 'snapkv': no control or bidi characters reach a terminal

A label (a method key, a task, a budget, a model name from a results file) reaches the terminal, markdown and figures
only through `clean_label`: terminal escapes (ESC, CSI), other control characters, and format characters such as the
bidirectional overrides (U+202E) and zero-width joiners are removed; whitespace runs become one space.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from .errors import DapqError

__all__ = ["clean_label", "finite"]


def finite(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    what: str = "",
) -> float:
    """`value` as a float if it is a real, finite number within [low, high] ((low, high] with `low_open`), else a
    one-line DapqError naming `name` (and `what`, e.g. the file and line)."""
    where = f"{what}: " if what else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DapqError(f"{where}{name} must be a number; got {value!r}.")
    v = float(value)
    if not math.isfinite(v):
        raise DapqError(f"{where}{name} must be a finite number; got {value!r}.")
    if low is not None and (v <= low if low_open else v < low):
        raise DapqError(f"{where}{name} must be {'>' if low_open else '>='} {low:g}; got {value!r}.")
    if high is not None and v > high:
        raise DapqError(f"{where}{name} must be <= {high:g}; got {value!r}.")
    return v


def clean_label(text: Any, limit: int = 200) -> str:
    """`text` as a printable one-line label: control (Cc), format (Cf: bidi overrides, zero-width), private-use and
    unassigned characters removed, whitespace collapsed, at most `limit` characters."""
    out = []
    for ch in str(text):
        if ch.isspace():
            out.append(" ")
        elif unicodedata.category(ch)[0] != "C":
            out.append(ch)
    return " ".join("".join(out).split())[:limit]
