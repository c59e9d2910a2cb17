"""LongBench v1 loader: the 13 English subsets the DapQ paper uses, with the official prompts, lengths and metrics.

    from dapq.tasks.longbench import longbench_samples
    samples = longbench_samples(tokenizer, "hotpotqa", data_dir="~/data/LongBench", max_prompt_tokens=7680)
    # CLI: dapq eval longbench --data-dir ~/data/LongBench --subsets qasper,hotpotqa   (or --from-hub when online)

Data: the official data.zip of the Hugging Face dataset THUDM/LongBench, unzipped: one `{subset}.jsonl` per subset
(records {input, context, answers[], length, dataset, language, all_classes, _id}); `data_dir` may be the folder
holding the jsonl files or the one holding `data/`. `from_hub=True` loads through the `datasets` library instead.

Prompts follow config/dataset2prompt.json, max new tokens config/dataset2maxlen.json, metrics eval.py; the long
context is cut in the middle (pred.py keeps the first and last halves of the prompt's tokens). How a template becomes
a `Sample`: the text up to and including `{context}` is `Sample.context`, the rest (with `{input}` filled) is
`Sample.question`. `dapq.prompts.build_prompt` joins the two with "\\n\\n"; `split_at_junction` moves that many
newlines out of the text at the junction, so the joined prompt equals the official one whenever the template and
data put at least two newlines there (10 of the 13 templates do by construction; trec, lcc and repobench-p depend on
whether the data's context ends with newlines, else their prompt has one or two extra newlines at the junction).

Long contexts are fitted with `dapq.prompts.fit_prompt`; this module also holds the file helpers shared by the
LongBench v2 and HELMET loaders (`read_records`, `import_datasets`). Tests: tests/test_loaders.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..prompts import fit_prompt, split_at_junction
from .registry import Family, Task, TaskArgs, select_tasks
from .sample import Sample

__all__ = [
    "LONGBENCH_SUBSETS",
    "LONGBENCH_PROMPTS",
    "LONGBENCH_MAX_NEW_TOKENS",
    "LONGBENCH_METRICS",
    "NO_CHAT_SUBSETS",
    "FIRST_LINE_SUBSETS",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "longbench_samples",
    "read_records",
    "import_datasets",
]

LONGBENCH_SUBSETS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)
_QASPER_RULES = (
    "Answer the question based on the above article as concisely as you can, using a single phrase or sentence if "
    'possible. If the question cannot be answered based on the information in the article, write "unanswerable". If '
    'the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)

#: The official templates (LongBench config/dataset2prompt.json), `{context}` and `{input}` filled from the record.
LONGBENCH_PROMPTS: dict[str, str] = {
    "qasper": (
        "You are given a scientific article and a question. "
        + _QASPER_RULES.replace("based on the above article ", "", 1)
        + "\n\nArticle: {context}\n\n "
        + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: config/dataset2maxlen.json
LONGBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "gov_report": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: eval.py dataset2metric, with names of `dapq.tasks.metrics.METRICS`
LONGBENCH_METRICS: dict[str, str] = {
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "gov_report": "rouge_l",
    "multi_news": "rouge_l",
    "trec": "classification_score",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

#: pred.py builds no chat prompt for these ("chat models are better off without build prompts on these tasks").
NO_CHAT_SUBSETS = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
#: eval.py scores only the first line for these. lcc / repobench-p are not among them: code_sim picks its own line.
FIRST_LINE_SUBSETS = frozenset({"trec", "triviaqa", "samsum"})

#: Default prompt budget: an 8k-position model (e.g. the bundled SmolLM2's 8192) minus the longest generation (512).
DEFAULT_MAX_PROMPT_TOKENS = 8192 - 512
_HUB_ID = "THUDM/LongBench"
_HUB_HINT = (
    "Get the data from the Hugging Face dataset THUDM/LongBench: download data.zip "
    "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it and pass the folder as "
    "data_dir (CLI: --data-dir), or use from_hub=True (CLI: --from-hub) on a machine with network."
)


# ---------------------------------------------------------------------------------------------------- file helpers
def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, or of a JSON file holding a list (or {"data": [...]})."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    elif stripped.startswith("{") and path.suffix == ".json":
        try:
            loaded = json.loads(text)
            records = loaded["data"] if isinstance(loaded, dict) and "data" in loaded else [loaded]
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DapqError(f"{path} is not JSON lines (line parse failed: {err}).") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DapqError(f"{path} must hold JSON objects (one per line, or a JSON list of them).")
    return records


def import_datasets() -> Any:
    """The `datasets` library, imported lazily (only the from_hub paths need it)."""
    try:
        import datasets
    except ImportError:
        raise DapqError(
            "Loading from the Hugging Face hub needs the `datasets` library: pip install datasets"
        ) from None
    return datasets


# ---------------------------------------------------------------------------------------------------- LongBench v1
def _load_records(subset: str, data_dir: str | Path | None, from_hub: bool) -> list[dict[str, Any]]:
    if from_hub:
        datasets = import_datasets()
        try:
            try:
                ds = datasets.load_dataset(_HUB_ID, subset, split="test", trust_remote_code=True)
            except TypeError:
                ds = datasets.load_dataset(_HUB_ID, subset, split="test")
        except Exception as err:  # network, hub or script errors: say what to do instead
            raise DapqError(
                f"Could not load LongBench/{subset} from the hub ({type(err).__name__}: {err}). " + _HUB_HINT
            ) from None
        return [dict(r) for r in ds]
    if data_dir is None:
        raise DapqError(f"LongBench/{subset}: no data_dir given. " + _HUB_HINT)
    root = Path(data_dir).expanduser()
    candidates = [root / f"{subset}.jsonl", root / "data" / f"{subset}.jsonl"]
    for path in candidates:
        if path.is_file():
            return read_records(path)
    raise DapqError(
        f"LongBench subset {subset!r} not found: looked for {', '.join(str(p) for p in candidates)}. " + _HUB_HINT
    )


def longbench_samples(
    tokenizer: Any,
    subset: str,
    data_dir: str | Path | None = None,
    from_hub: bool = False,
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    n: int | None = None,
) -> list[Sample]:
    """The samples of one LongBench v1 subset (the first `n` records in file order, or all).

    `max_prompt_tokens` bounds the prompt the model sees (as `build_prompt` builds it, chat template included;
    None: DEFAULT_MAX_PROMPT_TOKENS = 7680); longer contexts are cut in the middle. Metadata: subset, length (the
    record's word count), all_classes, first_line (the runner scores only the first line), stop_on_newline (samsum:
    pred.py also stops at "\\n"), prompt_tokens, truncated, document_tokens.
    """
    if subset not in LONGBENCH_PROMPTS:
        known = ", ".join(LONGBENCH_SUBSETS)
        raise DapqError(f"Unknown LongBench subset {subset!r}; the English subsets are: {known}.")
    if max_prompt_tokens is None:
        max_prompt_tokens = DEFAULT_MAX_PROMPT_TOKENS
    records = _load_records(subset, data_dir, from_hub)
    if n is not None:
        records = records[: max(n, 0)]
    template = LONGBENCH_PROMPTS[subset]
    before, after = template.split("{context}")
    chat = False if subset in NO_CHAT_SUBSETS else None
    samples = []
    seen: set[str] = set()
    for index, rec in enumerate(records):
        if "context" not in rec or "answers" not in rec:
            raise DapqError(f"LongBench/{subset} record {index} lacks 'context' or 'answers': not the official format.")
        sid = str(rec.get("_id") or index)
        if sid in seen:
            sid = f"{sid}-{index}"
        seen.add(sid)
        rest = after.replace("{input}", str(rec.get("input") or ""))
        answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
        metadata = {
            "subset": subset,
            "length": rec.get("length"),
            "all_classes": rec.get("all_classes"),
            "first_line": subset in FIRST_LINE_SUBSETS,
            "stop_on_newline": subset == "samsum",
        }

        def make(doc: str, rest: str = rest, sid: str = sid, answers: list = answers, md: dict = metadata) -> Sample:
            context, question = split_at_junction(before + doc, rest)
            return Sample(
                id=sid,
                task=f"longbench/{subset}",
                context=context,
                question=question,
                references=[str(a) for a in answers],
                metric=LONGBENCH_METRICS[subset],
                max_new_tokens=LONGBENCH_MAX_NEW_TOKENS[subset],
                chat_template=chat,
                metadata=dict(md),
            )

        samples.append(fit_prompt(tokenizer, make, str(rec["context"]), max_prompt_tokens, keep="middle"))
    return samples


# ---------------------------------------------------------------------------------------------------- the family
def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    return longbench_samples(
        tokenizer,
        task.subtask or "",
        data_dir=args.data_dir,
        from_hub=args.from_hub,
        max_prompt_tokens=args.max_prompt_tokens,
        n=args.n,
    )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder with the subsets' .jsonl files (LongBench's data.zip)")
    p.add_argument("--subsets", default="all", help="all (the 13 English subsets) or comma-separated names")
    p.add_argument("--from-hub", action="store_true", help="download THUDM/LongBench (needs network and `datasets`)")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    names = select_tasks("longbench", args.subsets)
    return names, TaskArgs(
        data_dir=args.data_dir, from_hub=args.from_hub, n=args.samples, max_prompt_tokens=args.max_prompt_tokens
    )


FAMILY = Family(
    "longbench",
    lambda: [Task(f"longbench/{s}", "longbench", LONGBENCH_METRICS[s], False, _generate) for s in LONGBENCH_SUBSETS],
    help="LongBench v1 English subsets from local files",
    add_options=_options,
    plan=_plan,
    word="LongBench subset",
    row_settings=("data_dir", "from_hub"),
)
