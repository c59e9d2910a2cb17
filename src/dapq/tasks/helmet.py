"""HELMET loader for the 11 subsets in the DapQ paper's Table 14: ICL, LongQA and RAG, rebuilt as HELMET's data.py
builds them, from local files (or the hub where HELMET itself reads the hub).

    from dapq.tasks.helmet import helmet_samples
    samples = helmet_samples(tokenizer, "kilt_nq", data_dir="~/HELMET/data", length=8192)
    # CLI: dapq eval helmet --data-dir ~/HELMET/data --subsets kilt_nq,icl_banking77 --length 8192

`length` is HELMET's input_max_length (8192, 16384, 32768, 65536 or 131072): it picks the RAG files and the ICL shot
counts of HELMET's configs (configs/*_short.yaml up to 64k, configs/*.yaml for 128k); the prompt (as
`build_prompt` counts it) is fitted to `max_prompt_tokens`, by default length - max_new_tokens - 4 as HELMET's
tokenize() does, by cutting the end of the long context (HELMET keeps the head).

Files (`data_dir` is HELMET's `data/` folder; everything is read with `json`, no `datasets` needed):

- kilt_nq, kilt_triviaqa, kilt_hotpotqa, kilt_popqa_3: kilt/nq-dev-multikilt_1000_k{K}_dep6.jsonl,
  kilt/triviaqa-dev-..._dep6, kilt/hotpotqa-dev-..._dep3, kilt/popqa_test_1000_k{K}_dep6.jsonl (K = 50, 105, 220,
  440, 1000 for 8k..128k), demos from the k3 train files (popqa: popqa_test_1000_k3_dep6.jsonl). They come from
  HELMET's data.tar.gz: `wget https://huggingface.co/datasets/princeton-nlp/HELMET/resolve/main/data.tar.gz`.
- icl_trec_coarse, icl_trec_fine: icl/trec/{train,test}.jsonl, rows {text, coarse_label, fine_label} (hub
  CogComp/trec); icl_banking77: icl/banking77/{train,test}.jsonl, {text, label} (hub PolyAI/banking77);
  icl_clinic150: icl/clinc_oos_plus/{train,validation}.jsonl, {text, intent} (hub clinc_oos, config plus);
  icl_nlu: icl/nlu_evaluation_data/train.jsonl, {text, label} (hub xingkunliuxtracta/nlu_evaluation_data; split
  90/10 with seed 42 here, as HELMET does).
- narrativeqa: narrativeqa/{test,train}.jsonl, the hub rows of deepmind/narrativeqa (document.text, question.text,
  answers[].text) or flat {context, question, answers}.
- infbench_qa_eng: infbench/longbook_qa_eng.jsonl, InfiniteBench's file ({id, context, input, answer[]}; hub
  xinrongzhang2022/InfiniteBench).

ICL and LongQA files are the hub splits written in hub order, e.g.
`datasets.load_dataset("PolyAI/banking77")["train"].to_json("icl/banking77/train.jsonl")`; `from_hub=True` loads them
through `datasets` instead (RAG has no hub path: HELMET ships it as a tarball).

What is reproduced exactly: prompts and answer prefixes; the RAG test subset (Python random seeded 42 sampling the
sorted question keys), its 2 demos per question (numpy permutation seeded by the question's sha256, as
`Dataset.shuffle(seed=h)` does) and the popqa popularity filter; the ICL balanced demos (random.Random(42)), the
per-sample random label numbers (seeded by the text's sha256 + 42) and the 500-sample test subset; infbench's
100-sample subset and its 2 demos. What is not: HELMET first cuts LongQA stories to a fixed number of Llama-2 tokens
(e.g. 7892 for narrativeqa at 8k) with the marker " ... [the rest of the text is omitted]"; we cut with the evaluated
model's tokenizer to the prompt budget and add the same marker. narrativeqa's 2 demos come from an unseeded shuffle in
HELMET, so they cannot be reproduced; ours are drawn from the train file with a seed per question. HELMET's model
classes default to the system message "You are a helpful assistant." in chat mode; `build_prompt` has none.
Tests: tests/test_loaders.py.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..prompts import fit_prompt
from .helmet_files import HELMET_SEED, find_file, helmet_meta, hub_rows, permutation, sha_int
from .helmet_longqa import longqa_samples
from .longbench import read_records
from .registry import Family, Task, TaskArgs, select_tasks
from .sample import Sample

__all__ = ["HELMET_SUBSETS", "HELMET_LENGTHS", "HELMET_METRICS", "helmet_samples"]

HELMET_SUBSETS: tuple[str, ...] = (
    "icl_banking77",
    "icl_clinic150",
    "icl_nlu",
    "icl_trec_coarse",
    "icl_trec_fine",
    "narrativeqa",
    "infbench_qa_eng",
    "kilt_hotpotqa",
    "kilt_nq",
    "kilt_popqa_3",
    "kilt_triviaqa",
)
HELMET_LENGTHS: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
HELMET_METRICS: dict[str, str] = {
    **{s: "helmet_exact_match" for s in HELMET_SUBSETS if s.startswith("icl_")},
    **{s: "helmet_substring_exact_match" for s in HELMET_SUBSETS if s.startswith("kilt_")},
    "narrativeqa": "helmet_f1",
    "infbench_qa_eng": "helmet_rougeL_f1",
}
#: generation_max_length in HELMET's configs
_MAX_NEW = {"icl": 20, "kilt": 20, "narrativeqa": 100, "infbench_qa_eng": 10}
#: max_test_samples in HELMET's configs
_DEFAULT_N = {"icl": 500, "kilt": 100, "narrativeqa": 100, "infbench_qa_eng": 100}
_HINT_RAG = (
    "Get HELMET's data with `wget https://huggingface.co/datasets/princeton-nlp/HELMET/resolve/main/data.tar.gz && "
    "tar xzf data.tar.gz` and pass the extracted data/ folder as data_dir (CLI: --data-dir)."
)

# ---------------------------------------------------------------------------------------------------- ICL
#: shots per input length: icl_short.yaml (8k-64k) and icl.yaml (128k)
_ICL_SHOTS: dict[str, tuple[int, ...]] = {
    "icl_trec_coarse": (400, 800, 1600, 3300, 6600),
    "icl_trec_fine": (400, 800, 1600, 3200, 6400),
    "icl_banking77": (360, 720, 1450, 2900, 5900),
    "icl_clinic150": (440, 880, 1750, 3525, 7050),
    "icl_nlu": (510, 1020, 2040, 4080, 8296),
}
# subset -> (local folder, hub name, hub config, train split, test split or None for the nlu 90/10 split,
#            label field, number of labels)
_ICL_DATA: dict[str, tuple[str, str, str | None, str, str | None, str, int]] = {
    "icl_trec_coarse": ("trec", "CogComp/trec", None, "train", "test", "coarse_label", 6),
    "icl_trec_fine": ("trec", "CogComp/trec", None, "train", "test", "fine_label", 50),
    "icl_banking77": ("banking77", "PolyAI/banking77", None, "train", "test", "label", 77),
    "icl_clinic150": ("clinc_oos_plus", "clinc_oos", "plus", "train", "validation", "intent", 151),
    "icl_nlu": ("nlu_evaluation_data", "xingkunliuxtracta/nlu_evaluation_data", None, "train", None, "label", 68),
}
_ICL_INSTRUCTION = (
    'Use the provided mapping from the text to label to assign a label to the text. Only output "label: {label}" and '
    "nothing else. \n\n"
)

# ---------------------------------------------------------------------------------------------------- RAG
_RAG_K = {8192: 50, 16384: 105, 32768: 220, 65536: 440, 131072: 1000}
_RAG_FILES = {  # subset -> (test file pattern, demo file)
    "kilt_nq": ("nq-dev-multikilt_1000_k{k}_dep6.jsonl", "nq-train-multikilt_1000_k3_dep6.jsonl"),
    "kilt_triviaqa": ("triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl", "triviaqa-train-multikilt_1000_k3_dep6.jsonl"),
    "kilt_hotpotqa": ("hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl", "hotpotqa-train-multikilt_1000_k3_dep3.jsonl"),
    "kilt_popqa_3": ("popqa_test_1000_k{k}_dep6.jsonl", "popqa_test_1000_k3_dep6.jsonl"),
}
_RAG_INSTRUCTION = (
    "Use the given documents to write a concise and short answer to the question. Write your answer in the following "
    "format:\nAnswer: [answer]\n\n"
)
_RAG_SHOTS = 2


# ---------------------------------------------------------------------------------------------------- public
def helmet_samples(
    tokenizer: Any,
    subset: str,
    data_dir: str | Path | None = None,
    *,
    length: int = 8192,
    max_prompt_tokens: int | None = None,
    n: int | None = None,
    from_hub: bool = False,
) -> list[Sample]:
    """The samples of one HELMET subset at HELMET input length `length` (see the module docstring for the files).

    `n` replaces HELMET's max_test_samples (ICL 500, RAG 100, LongQA 100) and is drawn the same way.
    `max_prompt_tokens` defaults to length - max_new_tokens - 4. Metadata: subset, length, prompt_tokens, truncated,
    document_tokens, stop_on_newline (ICL and RAG: HELMET stops at "\\n"), and the helmet_* keys the metrics read.
    """
    if subset not in HELMET_SUBSETS:
        raise DapqError(f"Unknown HELMET subset {subset!r}; supported: {', '.join(HELMET_SUBSETS)}.")
    if length not in HELMET_LENGTHS:
        raise DapqError(f"HELMET length must be one of {', '.join(map(str, HELMET_LENGTHS))}; got {length}.")
    kind = "icl" if subset.startswith("icl_") else "kilt" if subset.startswith("kilt_") else subset
    max_new = _MAX_NEW[kind]
    budget = length - max_new - 4 if max_prompt_tokens is None else max_prompt_tokens
    count = _DEFAULT_N[kind] if n is None else max(n, 0)
    if data_dir is None and not (from_hub and kind != "kilt"):
        hint = _HINT_RAG if kind == "kilt" else "Pass data_dir (CLI: --data-dir) or from_hub=True (CLI: --from-hub)."
        raise DapqError(f"HELMET/{subset}: no data_dir given. {hint}")
    root = Path(data_dir).expanduser() if data_dir is not None else Path(".")
    common = {"task": f"helmet/{subset}", "metric": HELMET_METRICS[subset], "max_new_tokens": max_new}
    if kind == "kilt":
        if from_hub:
            raise DapqError(f"HELMET/{subset} has no hub loader (HELMET ships it in a tarball). {_HINT_RAG}")
        return _rag(tokenizer, subset, root, length, budget, count, common)
    if kind == "icl":
        return _icl(tokenizer, subset, root, length, budget, count, common, from_hub)
    return longqa_samples(tokenizer, subset, root, length, budget, count, common, from_hub)


# ---------------------------------------------------------------------------------------------------- RAG
def _rag(
    tokenizer: Any, subset: str, root: Path, length: int, budget: int, count: int, common: dict[str, Any]
) -> list[Sample]:
    test_name, demo_name = _RAG_FILES[subset]
    test_name = test_name.format(k=_RAG_K[length])
    test_path = find_file(root, [f"kilt/{test_name}", test_name], _HINT_RAG, f"{subset} test file")
    demo_path = find_file(root, [f"kilt/{demo_name}", demo_name], _HINT_RAG, f"{subset} demo file")
    data, demos = read_records(test_path), read_records(demo_path)
    if "popqa" in subset:  # load_qa: keep log10(s_pop) < threshold (the suffix of the name) in data and demos
        threshold = float(subset.split("_")[-1])
        data = [d for d in data if math.log10(d["s_pop"]) < threshold]
        demos = [d for d in demos if math.log10(d["s_pop"]) < threshold]
    key = "id" if data and "id" in data[0] else "question"
    keys = sorted({str(d[key]) for d in data})
    chosen = set(random.Random(HELMET_SEED).sample(keys, min(count, len(keys))))  # eval.py seeds `random` with 42 first
    data = [d for d in data if str(d[key]) in chosen]

    def passages(ctxs: list[dict[str, Any]]) -> str:
        return "\n\n".join(f"Document (Title: {c.get('title', '')}): {c.get('text', '')}" for c in ctxs)

    samples = []
    for d in data:
        sample_key = str(d[key])
        pool = [x for x in demos if str(x.get(key)) != sample_key] if "popqa" in subset else demos
        picked: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i in permutation(len(pool), sha_int(sample_key) % 2**31):  # shuffle(seed=h), drop_duplicates, select
            k = str(pool[i].get(key))
            if k not in seen:
                seen.add(k)
                picked.append(pool[i])
            if len(picked) == _RAG_SHOTS:
                break
        demo_text = "\n\n".join(
            f"{passages(x['ctxs'])}\n\nQuestion: {x['question']}\nAnswer: {x['answers'][0]}" for x in picked
        )
        demo_text = demo_text + "\n\n" if picked else ""
        answers = d["answers"] if isinstance(d["answers"], list) else [d["answers"]]
        sid = sample_key if key == "id" else hashlib.sha256(sample_key.encode("utf-8")).hexdigest()[:16]
        metadata = helmet_meta(subset, length, prefix="Answer:", parse="Answer:", stop=True, parsed_only=False)

        def make(
            doc: str, d: dict = d, demo_text: str = demo_text, sid: str = sid, answers: list = answers, md=metadata
        ) -> Sample:
            return Sample(
                id=sid,
                context=_RAG_INSTRUCTION + demo_text + doc,
                question=f"Question: {d['question']}",
                references=[str(a) for a in answers],
                answer_prefix="\nAnswer:",
                chat_template=False,
                metadata=dict(md),
                **common,
            )

        samples.append(fit_prompt(tokenizer, make, passages(d.get("ctxs") or []), budget, keep="head"))
    return samples


# ---------------------------------------------------------------------------------------------------- ICL
def _icl_rows(subset: str, root: Path, hub: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    folder, name, config, train_split, test_split, _, _ = _ICL_DATA[subset]
    hint = (
        f"Write the hub splits of {name}{f' ({config})' if config else ''} as JSON lines under "
        f"{root / 'icl' / folder}/ (e.g. datasets.load_dataset(...)[split].to_json(path)), or use from_hub=True "
        "(CLI: --from-hub) on a machine with network."
    )
    splits = [train_split] + ([test_split] if test_split else [])
    if hub:
        rows = [hub_rows(name, config, s, hint) for s in splits]
    else:
        rows = [read_records(find_file(root, [f"icl/{folder}/{s}.jsonl"], hint, f"{subset} {s} split")) for s in splits]
    if test_split:
        return rows[0], rows[1]
    # nlu: Dataset.train_test_split(test_size=0.1, seed=42): test = perm[:ceil(0.1 n)], train = the rest, in order
    data = rows[0]
    n_test = math.ceil(0.1 * len(data))
    perm = permutation(len(data), HELMET_SEED)
    return [data[i] for i in perm[n_test:]], [data[i] for i in perm[:n_test]]


def _balance_labels(train: list[dict[str, Any]], label_field: str, shots: int) -> list[dict[str, Any]]:
    """load_icl's balance_labels: rounds of one example per label, each round shuffled, random.Random(42)."""
    rand = random.Random(HELMET_SEED)
    by_label: dict[Any, list[dict[str, Any]]] = {}
    for x in train:
        by_label.setdefault(x[label_field], []).append(x)
    rounds = math.ceil(shots / len(by_label))
    new_data: list[list[dict[str, Any]]] = [[] for _ in range(rounds)]
    for samples in by_label.values():
        indices = rand.sample(range(len(samples)), rounds % len(samples))
        while len(indices) < rounds:
            indices += rand.sample(range(len(samples)), min(rounds - len(indices), len(samples)))
        for i, idx in enumerate(indices):
            new_data[i].append(samples[idx])
    for block in new_data:
        rand.shuffle(block)
    return [item for block in new_data for item in block][:shots]


def _icl(
    tokenizer: Any,
    subset: str,
    root: Path,
    length: int,
    budget: int,
    count: int,
    common: dict[str, Any],
    hub: bool,
) -> list[Sample]:
    _, _, _, _, _, label_field, num_labels = _ICL_DATA[subset]
    train, test = _icl_rows(subset, root, hub)
    if not train or not test:
        raise DapqError(f"HELMET/{subset}: the train and test splits must both be non-empty.")
    for row in train[:1] + test[:1]:
        if "text" not in row or label_field not in row:
            raise DapqError(f"HELMET/{subset}: rows need 'text' and {label_field!r} fields; got {sorted(row)}.")
    shots = _ICL_SHOTS[subset][HELMET_LENGTHS.index(length)]
    indices = list(range(len(test)))
    if len(test) > count:  # test_data.shuffle(seed=42).select(range(max_test_sample))
        indices = permutation(len(test), HELMET_SEED)[:count]
    demos = _balance_labels(train, label_field, shots)  # the same demos for every test item (fixed seed)
    samples = []
    for index in indices:
        row = test[index]
        text = str(row["text"])
        mapping = list(range(num_labels))  # labels shown as random numbers, one permutation per test text
        random.Random((sha_int(text) + HELMET_SEED) % 2**31).shuffle(mapping)
        demo_text = "\n\n".join(f"{x['text']}\nlabel: {mapping[int(x[label_field])]}" for x in demos)
        metadata = helmet_meta(subset, length, prefix="label:", parse="label:", stop=True, parsed_only=True)
        metadata["shots"] = shots
        answer = str(mapping[int(row[label_field])])

        def make(doc: str, index: int = index, text: str = text, answer: str = answer, md: dict = metadata) -> Sample:
            return Sample(
                id=str(index),
                context=_ICL_INSTRUCTION + doc,
                question=text,
                references=[answer],
                answer_prefix="\nlabel:",
                chat_template=False,
                metadata=dict(md),
                **common,
            )

        samples.append(fit_prompt(tokenizer, make, demo_text, budget, keep="head"))
    return samples


# ---------------------------------------------------------------------------------------------------- the family
DEFAULT_LENGTH = 8192


def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    return [
        s
        for length in list(args.lengths) or [DEFAULT_LENGTH]
        for s in helmet_samples(
            tokenizer,
            task.subtask or "",
            args.data_dir,
            length=length,
            max_prompt_tokens=args.max_prompt_tokens,
            n=args.n,
            from_hub=args.from_hub,
        )
    ]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="HELMET's data/ folder")
    p.add_argument("--subsets", default="all", help="all (the 11 subsets of the paper) or comma-separated names")
    p.add_argument(
        "--length", type=int, default=DEFAULT_LENGTH, help="HELMET input length (picks RAG files, ICL shots)"
    )
    p.add_argument("--from-hub", action="store_true", help="download from the hub (needs network and `datasets`)")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    names = select_tasks("helmet", args.subsets)
    return names, TaskArgs(
        lengths=(args.length,),
        data_dir=args.data_dir,
        from_hub=args.from_hub,
        n=args.samples,
        max_prompt_tokens=args.max_prompt_tokens,
    )


FAMILY = Family(
    "helmet",
    lambda: [Task(f"helmet/{s}", "helmet", HELMET_METRICS[s], False, _generate) for s in HELMET_SUBSETS],
    help="HELMET subsets from local files",
    add_options=_options,
    plan=_plan,
    word="HELMET subset",
    row_settings=("data_dir", "from_hub", "length"),
)
