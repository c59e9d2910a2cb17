"""RULER's qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA dev distractor) built from local copies of the official files
(arXiv 2404.06654, App. B). `dapq.tasks.ruler` is the entry point (`ruler_samples`)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .ruler_gen import TOKENS_TO_GENERATE, Parts, fit_parts

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_INTRO = QA_INSTRUCTION + "\n\nThe following are given documents.\n\n"
QA_QUESTION = QA_INSTRUCTION + "\n\nQuestion: {query}"
QA_PREFIX = " Answer:"
QA_DOC = "Document {i}:\n{document}"
QA_FILES = {
    "qa_1": (
        ("squad.json", "dev-v2.0.json"),
        "SQuAD v2.0 dev",
        "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json",
    ),
    "qa_2": (
        ("hotpotqa.json", "hotpot_dev_distractor_v1.json"),
        "HotpotQA dev (distractor)",
        "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
    ),
}


# ---------------------------------------------------------------------------------------------------- qa_1 / qa_2
def _qa_path(task: str, data_dir: str | Path | None) -> Path:
    names, label, url = QA_FILES[task]
    how = f"download {url} and save it as DATA_DIR/{names[0]} (or keep its name {names[1]})"
    if data_dir is None:
        raise DapqError(f"ruler/{task} needs the {label} file and a data_dir: {how}, then pass data_dir=DATA_DIR.")
    folder = Path(data_dir).expanduser()
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DapqError(f"ruler/{task}: no {' or '.join(names)} in {folder}. It needs the {label} file: {how}.")


@functools.lru_cache(maxsize=4)
def _read_qa(task: str, path: str, mtime: float) -> tuple[list[dict[str, Any]], list[str]]:
    """(questions, documents) as RULER's qa.py reads them: SQuAD v2 dev without unanswerable questions (other
    paragraphs of the same article are the first distractors) or HotpotQA dev (title + sentences per document)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        qas: list[dict[str, Any]] = []
        if task == "qa_1":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            index = {c: i for i, c in enumerate(docs)}
            for d in data["data"]:
                article = [index[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    gold = index[p["context"]]
                    for q in p["qas"]:
                        if q.get("is_impossible") or not q["answers"]:
                            continue
                        qas.append(
                            {
                                "id": q["id"],
                                "query": q["question"],
                                "outputs": list(dict.fromkeys(a["text"] for a in q["answers"])),
                                "context": [gold],
                                "more_context": [i for i in article if i != gold],
                            }
                        )
        else:
            docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
            index = {c: i for i, c in enumerate(docs)}
            for d in data:
                gold = list(dict.fromkeys(index[f"{t}\n{''.join(s)}"] for t, s in d["context"]))
                qas.append(
                    {
                        "id": d["_id"],
                        "query": d["question"],
                        "outputs": [d["answer"]],
                        "context": gold,
                        "more_context": [],
                    }
                )
    except (KeyError, TypeError, ValueError) as exc:
        raise DapqError(f"{path} is not in the official {QA_FILES[task][1]} format ({exc!r}).") from exc
    if not qas:
        raise DapqError(f"{path} holds no answerable questions.")
    return qas, docs


def qa_parts(
    tokenizer: Any,
    task: str,
    length: int,
    seed: int,
    index: int,
    data_dir: str | Path | None,
    chat_template: bool | None,
) -> tuple[Parts, int, int]:
    path = _qa_path(task, data_dir)
    qas, docs = _read_qa(task, str(path), path.stat().st_mtime)
    item = qas[index % len(qas)]
    rng = random.Random(seed)
    gold, more = list(item["context"]), list(item["more_context"])
    rng.shuffle(more)
    used = set(gold) | set(more)
    rest = [i for i in range(len(docs)) if i not in used]
    rng.shuffle(rest)
    order = gold + more + rest
    shuffle_seed = rng.getrandbits(64)
    limit = length - TOKENS_TO_GENERATE["qa"]
    cum = [0]

    def est(n: int) -> float:
        while len(cum) <= n:  # count documents lazily, in batches
            batch = [QA_DOC.format(i=len(cum), document=docs[j]) for j in order[len(cum) - 1 : len(cum) + 63]]
            for x in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                cum.append(cum[-1] + len(x) + 2)
        return float(cum[n])

    def build(n: int) -> Parts:
        chosen = [docs[j] for j in order[:n]]
        random.Random(shuffle_seed).shuffle(chosen)
        context = QA_INTRO + "\n\n".join(QA_DOC.format(i=i + 1, document=d) for i, d in enumerate(chosen))
        meta = {"num_docs": n, "question_id": item["id"], "source": path.name}
        return Parts(context, QA_QUESTION.format(query=item["query"]), QA_PREFIX, list(item["outputs"]), meta)

    return fit_parts(tokenizer, build, est, limit, len(gold), len(order), chat_template, f"ruler/{task}")
