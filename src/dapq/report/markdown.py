"""Markdown for reports: one cell of untrusted text (labels and predictions come from data files)."""

from __future__ import annotations

from typing import Any

from ..checks import clean_label

#: the longest label a report prints (longer ones are cut, with an ellipsis)
LABEL_LIMIT = 10_000


def md_cell(text: Any) -> str:
    """Untrusted text as one markdown table cell or line: no control characters, `|` escaped."""
    return clean_label(text, limit=LABEL_LIMIT).replace("|", "\\|")
