"""HELMET's long-document QA subsets, narrativeqa and infbench_qa_eng (arXiv 2410.02694, App. B): the question
after the document (cut to the prompt budget, "... [the rest of the text is omitted]") with two solved examples.
`dapq.tasks.helmet.helmet_samples` is the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..prompts import fit_prompt
from .helmet_files import HELMET_SEED, find_file, helmet_meta, hub_rows, permutation, sha_int
from .longbench import read_records
from .sample import Sample

_NARRATIVEQA_INSTRUCTION = (
    "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as "
    "concisely as you can, using a single phrase if possible.\n\n"
)
_INFBENCH_INSTRUCTION = (
    "You are given a story and a question. Answer the question as concisely as you can, using a single phrase if "
    "possible.\n\n"
)
_OMITTED = " ... [the rest of the text is omitted]"
_LONGQA_SHOTS = 2


def _text_of(value: Any) -> str:
    return str(value.get("text", "")) if isinstance(value, dict) else str(value)


def _longqa_rows(subset: str, root: Path, hub: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test rows, demo pool) as flat {id, context, question, answers} dicts."""
    if subset == "infbench_qa_eng":
        hint = (
            "Download longbook_qa_eng.jsonl of InfiniteBench (hub dataset xinrongzhang2022/InfiniteBench) into "
            f"{root / 'infbench'}/, or use from_hub=True (CLI: --from-hub) on a machine with network."
        )
        if hub:
            raw = hub_rows("xinrongzhang2022/InfiniteBench", None, "longbook_qa_eng", hint)
        else:
            raw = read_records(
                find_file(
                    root, ["infbench/longbook_qa_eng.jsonl", "longbook_qa_eng.jsonl"], hint, "infbench_qa_eng file"
                )
            )
        rows = [
            {"id": str(r.get("id", i)), "context": str(r["context"]), "question": str(r["input"]),
             "answers": [str(a) for a in (r["answer"] if isinstance(r["answer"], list) else [r["answer"]])]}
            for i, r in enumerate(raw)
        ]  # fmt: skip
        return rows, rows
    hint = (
        "Write the test and train splits of the hub dataset deepmind/narrativeqa as JSON lines to "
        f"{root / 'narrativeqa'}/test.jsonl and train.jsonl, or use from_hub=True (CLI: --from-hub) online."
    )
    if hub:
        test_raw = hub_rows("deepmind/narrativeqa", None, "test", hint)
        train_raw = hub_rows("deepmind/narrativeqa", None, "train", hint)
    else:
        test_raw = read_records(find_file(root, ["narrativeqa/test.jsonl"], hint, "narrativeqa test split"))
        train_raw = read_records(find_file(root, ["narrativeqa/train.jsonl"], hint, "narrativeqa train split"))

    def flat(i: int, r: dict[str, Any]) -> dict[str, Any]:
        doc = r.get("document", r.get("context", ""))
        answers = r.get("answers", r.get("answer", []))
        return {
            "id": str(i),
            "context": _text_of(doc),
            "question": _text_of(r.get("question", "")),
            "answers": [_text_of(a) for a in (answers if isinstance(answers, list) else [answers])],
        }

    return [flat(i, r) for i, r in enumerate(test_raw)], [flat(i, r) for i, r in enumerate(train_raw)]


def longqa_samples(
    tokenizer: Any,
    subset: str,
    root: Path,
    length: int,
    budget: int,
    count: int,
    common: dict[str, Any],
    hub: bool,
) -> list[Sample]:
    test, pool = _longqa_rows(subset, root, hub)
    chosen = permutation(len(test), HELMET_SEED)[: min(count, len(test))]  # shuffle(seed=42).select(range(100))
    use_chat = getattr(tokenizer, "chat_template", None) is not None  # HELMET's longqa configs use the chat template
    infbench = subset == "infbench_qa_eng"
    instruction = _INFBENCH_INSTRUCTION if infbench else _NARRATIVEQA_INSTRUCTION
    # without a chat template HELMET appends its system template: "\n\nAnswer:" (infbench) or "\nAnswer:"
    answer_prefix = "" if use_chat else ("\n\nAnswer:" if infbench else "\nAnswer:")
    samples = []
    for index in chosen:
        row = test[index]
        demo = _longqa_demo(row, pool, infbench)
        metadata = helmet_meta(subset, length, prefix="" if use_chat else "Answer:", parse="Answer:", stop=False,
                         parsed_only=False)  # fmt: skip

        def make(doc: str, row: dict = row, demo: str = demo, md: dict = metadata) -> Sample:
            return Sample(
                id=row["id"],
                context=instruction + demo + doc,
                question=f"Question: {row['question']}",
                references=list(row["answers"]),
                answer_prefix=answer_prefix,
                chat_template=use_chat,
                metadata=dict(md),
                **common,
            )

        samples.append(fit_prompt(tokenizer, make, row["context"], budget, keep="head", marker=_OMITTED))
    return samples


def _longqa_demo(row: dict[str, Any], pool: list[dict[str, Any]], infbench: bool) -> str:
    if infbench:  # all_data.filter(id != this id).shuffle(seed=42).select(range(2))
        others = [x for x in pool if x["id"] != row["id"]]
        picked = [others[i] for i in permutation(len(others), HELMET_SEED)[:_LONGQA_SHOTS]]
        body = "\n\n".join(f"[story text]\nQuestion: {x['question']}\nAnswer: {x['answers'][0]}" for x in picked)
        return f"For example:\n\n{body}\n\nNow, read the following story:\n\n"
    # narrativeqa: HELMET draws 2 train questions with an unseeded shuffle; we seed by the question text
    usable = [x for x in pool if x["answers"]]
    seed = sha_int(row["question"]) % 2**31
    picked = [usable[i] for i in permutation(len(usable), seed)[:_LONGQA_SHOTS]]
    body = "\n\n".join(f"Question: {x['question']}\nAnswer: {x['answers'][0]}" for x in picked)
    return f"For example:\n\n{body}\n\nNow, use the following story to answer the question:\n\n"
