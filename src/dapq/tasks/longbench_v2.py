"""LongBench v2 loader: 503 multiple-choice questions over long contexts, scored Overall / Easy / Hard / Short /
Medium / Long.

    from dapq.tasks.longbench_v2 import longbench_v2_samples, V2_GROUPS
    samples = longbench_v2_samples(tokenizer, "~/data/LongBench-v2/data.json", max_prompt_tokens=7680)
    # CLI: dapq eval longbench-v2 --data-file ~/data/LongBench-v2/data.json

Data: a local copy of the Hugging Face dataset THUDM/LongBench-v2 (its data.json, a JSON list; JSON lines work too),
records {_id, domain, sub_domain, difficulty, length, question, choice_A..choice_D, answer, context}.
Prompt: the official prompts/0shot.txt, with context, question and choices stripped as pred.py does; the sample's
context part runs to "</text>", the question part starts at "What is the correct answer", and `build_prompt`'s
"\\n\\n" between them is exactly the template's. Long contexts are cut in the middle (pred.py keeps the first and last
halves of the prompt's tokens). 128 new tokens, the answer letter extracted as pred.py does (metric
`longbench_v2_choice`). `V2_GROUPS` says which metadata value puts a sample in each reported column.
Tests: tests/test_loaders.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..prompts import fit_prompt
from .longbench import read_records
from .registry import Family, Task, TaskArgs
from .sample import Sample

__all__ = ["longbench_v2_samples", "V2_GROUPS", "V2_MAX_NEW_TOKENS"]

_CONTEXT_PART = "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>"
_QUESTION_PART = (
    "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
#: pred.py, non-CoT: max_new_tokens=128
V2_MAX_NEW_TOKENS = 128
#: result.py columns: (metadata key, value); Overall is every sample.
V2_GROUPS: dict[str, tuple[str, str] | None] = {
    "Overall": None,
    "Easy": ("difficulty", "easy"),
    "Hard": ("difficulty", "hard"),
    "Short": ("length", "short"),
    "Medium": ("length", "medium"),
    "Long": ("length", "long"),
}
_REQUIRED = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
_HINT = (
    "Download data.json from the Hugging Face dataset THUDM/LongBench-v2 "
    "(https://huggingface.co/datasets/THUDM/LongBench-v2/resolve/main/data.json) and pass its path as data_file "
    "(CLI: --data-file)."
)


def longbench_v2_samples(
    tokenizer: Any, data_file: str | Path, max_prompt_tokens: int | None, n: int | None = None
) -> list[Sample]:
    """The LongBench v2 samples of `data_file` (the first `n` in file order, or all), each fitted to
    `max_prompt_tokens` (as `build_prompt` counts them, chat template included; None: 8192 - 128 = 8064).

    Metadata: difficulty (easy|hard), length (short|medium|long), domain, sub_domain, prompt_tokens, truncated,
    document_tokens.
    """
    if max_prompt_tokens is None:
        max_prompt_tokens = 8192 - V2_MAX_NEW_TOKENS
    path = Path(data_file).expanduser()
    if not path.is_file():
        raise DapqError(f"LongBench v2 data file not found: {path}. " + _HINT)
    records = read_records(path)
    if n is not None:
        records = records[: max(n, 0)]
    samples = []
    for index, rec in enumerate(records):
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise DapqError(f"{path} record {index} lacks {', '.join(missing)}: not the LongBench v2 format. " + _HINT)
        answer = str(rec["answer"]).strip()
        if answer not in ("A", "B", "C", "D"):
            raise DapqError(f"{path} record {index}: answer must be one of A-D, got {answer!r}.")
        question = _QUESTION_PART.format(
            question=str(rec["question"]).strip(),
            A=str(rec["choice_A"]).strip(),
            B=str(rec["choice_B"]).strip(),
            C=str(rec["choice_C"]).strip(),
            D=str(rec["choice_D"]).strip(),
        )
        metadata = {
            "difficulty": rec.get("difficulty"),
            "length": rec.get("length"),
            "domain": rec.get("domain"),
            "sub_domain": rec.get("sub_domain"),
        }
        sid = str(rec.get("_id") or index)

        def make(doc: str, question: str = question, sid: str = sid, answer: str = answer, md: dict = metadata):
            return Sample(
                id=sid,
                task="longbench_v2",
                context=_CONTEXT_PART.replace("{context}", doc),
                question=question,
                references=[answer],
                metric="longbench_v2_choice",
                max_new_tokens=V2_MAX_NEW_TOKENS,
                chat_template=None,
                metadata=dict(md),
            )

        samples.append(fit_prompt(tokenizer, make, str(rec["context"]).strip(), max_prompt_tokens, keep="middle"))
    return samples


# ---------------------------------------------------------------------------------------------------- the family
def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    data_file = args.data_file
    if data_file is None and args.data_dir is not None:
        data_file = Path(args.data_dir).expanduser() / "data.json"
    if data_file is None:
        raise DapqError("longbench-v2 reads THUDM/LongBench-v2's data.json: pass its path (CLI: --data-file).")
    return longbench_v2_samples(tokenizer, data_file, max_prompt_tokens=args.max_prompt_tokens, n=args.n)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-file", required=True, help="THUDM/LongBench-v2's data.json")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    return ["longbench-v2"], TaskArgs(
        data_file=args.data_file, n=args.samples, max_prompt_tokens=args.max_prompt_tokens
    )


FAMILY = Family(
    "longbench-v2",
    lambda: [Task("longbench-v2", "longbench-v2", "longbench_v2_choice", False, _generate)],
    help="LongBench v2 from a local file",
    add_options=_options,
    plan=_plan,
    row_settings=("data_file",),
)
