"""What every benchmark task yields: a `Sample` (context, question, answer prefix, references, metric, metadata).

Tasks are seeded generators (NIAH, RULER) or loaders of local files in the official formats (LongBench v1/v2,
HELMET). The runner (`dapq.harness.runner`) turns samples into prompts with `dapq.prompts.build_prompt`, so the
context part is what question-agnostic mode compresses and context + question is what query-aware mode compresses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Sample:
    """One evaluation item. `metric` names a function in `dapq.tasks.metrics.METRICS`."""

    id: str  # unique within its task, stable across runs with the same seed (used to resume)
    task: str  # e.g. "niah", "ruler/niah_single_1", "longbench/qasper"
    context: str
    question: str
    references: list[str]
    metric: str
    max_new_tokens: int
    answer_prefix: str = ""
    chat_template: bool | None = None  # None: use the tokenizer's template when it has one
    separator: str = "\n\n"  # between context and question (`build_prompt`)
    metadata: dict[str, Any] = field(default_factory=dict)  # length, depth, seed, subset, difficulty, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prompt_ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        """(context part, question part) token ids, exactly as `generate` builds them for this sample."""
        from ..prompts import build_prompt

        return build_prompt(
            tokenizer,
            self.context,
            self.question,
            chat_template=self.chat_template,
            answer_prefix=self.answer_prefix,
            separator=self.separator,
        )


def round_robin(groups: list[list[T]]) -> list[T]:
    """Item 0 of every group, then item 1 of every group, ...; groups may differ in length.

    Task suites use it so that a run stopped part-way has the same number of samples in every task."""
    out: list[T] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
