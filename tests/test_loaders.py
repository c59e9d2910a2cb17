"""LongBench v1 / v2 and HELMET loaders on small fixture files in the official formats (tests/fixtures/).

Run: python -m pytest -q tests/test_loaders.py

A whitespace tokenizer stub stands in for a model tokenizer (no model, no download): every run of non-space
characters and every run of whitespace is one token, so decode(encode(x)) == x and token counts are easy to reason
about. Checked: the joined prompt (context + "\\n\\n" + question, as build_prompt joins them) equals the official
template text; truncation keeps head and tail (LongBench) or the head (HELMET) and fits the limit; missing files raise
DapqError with a hint that says where to get the data.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from dapq.errors import DapqError
from dapq.prompts import sample_prompt_tokens as prompt_tokens
from dapq.prompts import split_at_junction
from dapq.tasks.helmet import HELMET_METRICS, helmet_samples
from dapq.tasks.longbench import (
    LONGBENCH_MAX_NEW_TOKENS,
    LONGBENCH_METRICS,
    LONGBENCH_PROMPTS,
    LONGBENCH_SUBSETS,
    longbench_samples,
)
from dapq.tasks.longbench_v2 import longbench_v2_samples
from dapq.tasks.metrics import METRICS

FIXTURES = Path(__file__).parent / "fixtures"
LB_DIR = FIXTURES / "longbench"
V2_FILE = FIXTURES / "longbench_v2" / "data.json"
HELMET_DIR = FIXTURES / "helmet"


class WsTokenizer:
    """Whitespace tokenizer stub with lossless decode; `chat=True` adds a minimal chat template."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, chat: bool = False) -> None:
        self.chat_template = "<user>{content}</user><assistant>" if chat else None
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for piece in re.findall(r"\s+|\S+", text):
            if piece not in self._ids:
                self._ids[piece] = len(self._ids) + 3
                self._pieces[self._ids[piece]] = piece
            ids.append(self._ids[piece])
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self._pieces.get(i, "" if skip_special_tokens else f"<{i}>") for i in ids)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True):
        return "<user>\n" + messages[-1]["content"] + "\n</user>\n<assistant>\n"


def joined(sample: Any) -> str:
    """The prompt text as build_prompt assembles it without a chat template."""
    return sample.context + "\n\n" + sample.question + sample.answer_prefix


def official(subset: str, record: dict) -> str:
    return LONGBENCH_PROMPTS[subset].replace("{context}", record["context"]).replace("{input}", record["input"])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- LongBench v1
def test_longbench_hotpotqa_prompt_metric_and_metadata() -> None:
    tok = WsTokenizer()
    samples = longbench_samples(tok, "hotpotqa", data_dir=LB_DIR / "data")
    recs = records(LB_DIR / "data" / "hotpotqa.jsonl")
    assert [s.id for s in samples] == ["hp-001", "hp-002"]
    for s, rec in zip(samples, recs):
        assert joined(s) == official("hotpotqa", rec)
        assert s.context.endswith(rec["context"]) and s.question.startswith("Answer the question based on")
        assert s.task == "longbench/hotpotqa" and s.metric == "qa_f1" and s.metric in METRICS
        assert s.max_new_tokens == 32 and s.chat_template is None
        assert s.references == rec["answers"]
        assert s.metadata["first_line"] is False and s.metadata["truncated"] is False
        assert s.metadata["prompt_tokens"] == prompt_tokens(tok, s)


def test_longbench_data_folder_layouts_and_n() -> None:
    tok = WsTokenizer()
    nested = longbench_samples(tok, "hotpotqa", data_dir=LB_DIR)  # the folder that holds data/
    flat = longbench_samples(tok, "hotpotqa", data_dir=LB_DIR / "data")
    assert [s.to_dict() for s in nested] == [s.to_dict() for s in flat]
    assert len(longbench_samples(tok, "hotpotqa", data_dir=LB_DIR, n=1)) == 1


def test_longbench_trec_no_chat_first_line_and_classes() -> None:
    samples = longbench_samples(WsTokenizer(), "trec", data_dir=LB_DIR)
    recs = records(LB_DIR / "data" / "trec.jsonl")
    s = samples[0]
    assert s.chat_template is False and s.metadata["first_line"] is True
    assert s.metric == "classification_score" and s.max_new_tokens == 64
    assert s.metadata["all_classes"] == recs[0]["all_classes"]
    # the first context ends with '\n' and the template has '\n' before {input}: two newlines, prompt exact
    assert joined(s) == official("trec", recs[0])
    # the second context has no trailing newline: the joined prompt has '\n\n' where the template has '\n'
    second = official("trec", recs[1])
    cut = len(LONGBENCH_PROMPTS["trec"].split("{context}")[0]) + len(recs[1]["context"])
    assert joined(samples[1]) == second[:cut] + "\n" + second[cut:]


def test_longbench_lcc_code_sim_not_first_line() -> None:
    (s,) = longbench_samples(WsTokenizer(), "lcc", data_dir=LB_DIR)
    assert s.metric == "code_sim" and s.chat_template is False
    # eval.py takes the first line only for trec/triviaqa/samsum; code_sim chooses its own line for lcc
    assert s.metadata["first_line"] is False
    rec = records(LB_DIR / "data" / "lcc.jsonl")[0]
    assert s.context.startswith("Please complete the code given below. \nclass Calc:")
    assert s.question == "Next line of code:\n"
    assert s.context + "\n\n" + s.question == official("lcc", rec).replace("\nNext line", "\n\nNext line")


@pytest.mark.parametrize("subset", LONGBENCH_SUBSETS)
def test_longbench_every_subset_matches_its_template(subset: str, tmp_path: Path) -> None:
    rec = {"input": "the question?", "context": "first passage\nsecond passage\n\n", "answers": ["12"], "_id": "x"}
    rec["all_classes"] = ["12"] if subset == "trec" else None
    (tmp_path / f"{subset}.jsonl").write_text(json.dumps(rec) + "\n")
    (s,) = longbench_samples(WsTokenizer(), subset, data_dir=tmp_path)
    assert joined(s) == official(subset, rec)  # two or more newlines at the junction: exact for every template
    assert s.metric == LONGBENCH_METRICS[subset] and s.max_new_tokens == LONGBENCH_MAX_NEW_TOKENS[subset]
    assert s.metadata["stop_on_newline"] is (subset == "samsum")


def test_split_at_junction() -> None:
    assert split_at_junction("ctx", "\n\nq") == ("ctx", "q")
    assert split_at_junction("ctx\n", "\nq") == ("ctx", "q")
    assert split_at_junction("ctx\n\n\n", "q") == ("ctx\n", "q")
    assert split_at_junction("ctx", "\nq") == ("ctx", "q")  # one newline short: the joined text gains one


def test_longbench_truncation_keeps_head_and_tail_and_fits(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(2000)]
    rec = {"input": "which word?", "context": " ".join(words), "answers": ["w7"], "_id": "long"}
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(rec) + "\n")
    tok, limit = WsTokenizer(), 301
    (s,) = longbench_samples(tok, "hotpotqa", data_dir=tmp_path, max_prompt_tokens=limit)
    total = prompt_tokens(tok, s)
    assert limit - 3 <= total <= limit and s.metadata["prompt_tokens"] == total
    assert s.metadata["truncated"] is True and s.metadata["document_tokens"] == 3999
    kept = s.context.split("The following are given passages.\n", 1)[1]
    assert kept.startswith("w0 w1 w2 ") and kept.endswith(" w1998 w1999")
    assert " w1000 " not in kept
    # pred.py decodes head and tail separately and concatenates them: the seam joins two words ('w49w1948')
    seam = re.search(r"w\d+(w\d+)", kept)
    assert seam is not None
    # the cut sits at the prompt's token midpoint, as pred.py's prompt[:half] + prompt[-half:]
    head_text = s.context[: s.context.index(kept) + seam.start(1)]
    assert abs(len(tok.encode(head_text)) - limit // 2) <= 3
    # the question part is never cut
    assert s.question.endswith("Question: which word?\nAnswer:")


def test_longbench_prompt_too_small_raises(tmp_path: Path) -> None:
    (tmp_path / "qasper.jsonl").write_text(json.dumps({"input": "q", "context": "c " * 50, "answers": ["a"]}) + "\n")
    with pytest.raises(DapqError, match="raise max_prompt_tokens"):
        longbench_samples(WsTokenizer(), "qasper", data_dir=tmp_path, max_prompt_tokens=20)


def test_longbench_missing_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DapqError, match=r"THUDM/LongBench.*data\.zip|data\.zip"):
        longbench_samples(WsTokenizer(), "qasper", data_dir=tmp_path)
    with pytest.raises(DapqError, match="no data_dir"):
        longbench_samples(WsTokenizer(), "qasper")
    with pytest.raises(DapqError, match="Unknown LongBench subset"):
        longbench_samples(WsTokenizer(), "dureader", data_dir=LB_DIR)
    (tmp_path / "qasper.jsonl").write_text(json.dumps({"input": "q"}) + "\n")
    with pytest.raises(DapqError, match="official format"):
        longbench_samples(WsTokenizer(), "qasper", data_dir=tmp_path)


def test_longbench_from_hub_needs_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DapqError, match="pip install datasets"):
        longbench_samples(WsTokenizer(), "hotpotqa", from_hub=True)


def test_longbench_from_hub_with_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = records(LB_DIR / "data" / "hotpotqa.jsonl")

    def load_dataset(name: str, config: str, split: str, **kw: Any) -> list[dict]:
        calls.append((name, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples = longbench_samples(WsTokenizer(), "hotpotqa", from_hub=True)
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]
    assert joined(samples[0]) == official("hotpotqa", rows[0])


# ---------------------------------------------------------------------------------------------------- LongBench v2
V2_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)  # prompts/0shot.txt


def v2_official(rec: dict) -> str:
    out = V2_TEMPLATE.replace("$DOC$", rec["context"].strip()).replace("$Q$", rec["question"].strip())
    for letter in "ABCD":
        out = out.replace(f"$C_{letter}$", rec[f"choice_{letter}"].strip())
    return out


def test_longbench_v2_prompt_and_groups() -> None:
    samples = longbench_v2_samples(WsTokenizer(), V2_FILE, max_prompt_tokens=4000)
    recs = json.loads(V2_FILE.read_text())
    assert [s.id for s in samples] == ["v2-001", "v2-002", "v2-003"]
    for s, rec in zip(samples, recs):
        assert joined(s) == v2_official(rec)
        assert s.context.endswith("\n</text>") and s.question.startswith("What is the correct answer")
        assert s.references == [rec["answer"]] and s.metric == "longbench_v2_choice" and s.max_new_tokens == 128
        assert {k: s.metadata[k] for k in ("difficulty", "length", "domain")} == {
            k: rec[k] for k in ("difficulty", "length", "domain")
        }
    assert len(longbench_v2_samples(WsTokenizer(), V2_FILE, max_prompt_tokens=4000, n=2)) == 2


def test_longbench_v2_jsonl_and_truncation(tmp_path: Path) -> None:
    rec = json.loads(V2_FILE.read_text())[1]
    rec["context"] = " ".join(f"t{i}" for i in range(1500))
    path = tmp_path / "v2.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    tok = WsTokenizer()
    (s,) = longbench_v2_samples(tok, path, max_prompt_tokens=400)
    assert prompt_tokens(tok, s) <= 400 and s.metadata["truncated"] is True
    body = s.context.split("<text>\n", 1)[1]
    assert body.startswith("t0 t1 ") and body.endswith(" t1499\n</text>")
    assert "Format your response as follows" in s.question


def test_longbench_v2_errors(tmp_path: Path) -> None:
    with pytest.raises(DapqError, match="THUDM/LongBench-v2"):
        longbench_v2_samples(WsTokenizer(), tmp_path / "missing.json", max_prompt_tokens=100)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "context": "c"}]))
    with pytest.raises(DapqError, match="not the LongBench v2 format"):
        longbench_v2_samples(WsTokenizer(), bad, max_prompt_tokens=100)


# ---------------------------------------------------------------------------------------------------- HELMET: RAG
RAG_INSTRUCTION = (
    "Use the given documents to write a concise and short answer to the question. Write your answer in the following "
    "format:\nAnswer: [answer]\n\n"
)


def passages(ctxs: list[dict]) -> str:
    return "\n\n".join(f"Document (Title: {c['title']}): {c['text']}" for c in ctxs)


def test_helmet_rag_prompt_demos_and_metadata() -> None:
    samples = helmet_samples(WsTokenizer(), "kilt_nq", HELMET_DIR, length=8192)
    recs = records(HELMET_DIR / "kilt" / "nq-dev-multikilt_1000_k50_dep6.jsonl")
    demos = records(HELMET_DIR / "kilt" / "nq-train-multikilt_1000_k3_dep6.jsonl")
    assert len(samples) == 3  # fewer records than max_test_samples=100: all of them, in file order
    for s, rec in zip(samples, recs):
        text = joined(s)
        assert text.startswith(RAG_INSTRUCTION)
        assert text.endswith(passages(rec["ctxs"]) + f"\n\nQuestion: {rec['question']}\nAnswer:")
        demo_part = text[len(RAG_INSTRUCTION) : len(text) - len(passages(rec["ctxs"])) - len(rec["question"]) - 20]
        shown = re.findall(r"Question: (.*)\nAnswer: (.*)", demo_part)
        assert len(shown) == 2 and len({q for q, _ in shown}) == 2  # 2 shots, duplicates dropped
        assert all(any(d["question"] == q and d["answers"][0] == a for d in demos) for q, a in shown)
        assert s.metric == "helmet_substring_exact_match" and s.max_new_tokens == 20 and s.chat_template is False
        assert s.answer_prefix == "\nAnswer:" and s.metadata["stop_on_newline"] is True
        assert s.references == rec["answers"]
    # deterministic: the demo order depends only on the question's sha256
    again = helmet_samples(WsTokenizer(), "kilt_nq", HELMET_DIR, length=8192)
    assert [x.to_dict() for x in again] == [x.to_dict() for x in samples]
    # the metric reads the loader's metadata: eval.py prepends 'Answer:' to the completion
    assert METRICS[s.metric](" Blue, mostly.", s.references, s.metadata) == 1.0


def test_helmet_popqa_filter_and_demo_exclusion() -> None:
    samples = helmet_samples(WsTokenizer(), "kilt_popqa_3", HELMET_DIR)
    # log10(s_pop) < 3 keeps s_pop 120, 40, 999 (ids 1, 3, 4) and drops 5000
    assert [s.id for s in samples] == ["1", "3", "4"]
    for s in samples:
        shown = re.findall(r"Question: (.*)\nAnswer:", s.context)
        assert len(shown) == 2
        assert s.question[len("Question: ") :] not in shown  # popqa: a question is never its own demo
        assert "What is the capital of Nowhere" not in shown  # s_pop 2000: filtered from the demos too


def test_helmet_rag_truncation_keeps_head(tmp_path: Path) -> None:
    kilt = tmp_path / "kilt"
    kilt.mkdir()
    ctxs = [{"title": f"T{i}", "text": f"passage number {i} text"} for i in range(300)]
    rec = {"question": "q?", "answers": ["x"], "ctxs": ctxs}
    (kilt / "nq-dev-multikilt_1000_k50_dep6.jsonl").write_text(json.dumps(rec) + "\n")
    (kilt / "nq-train-multikilt_1000_k3_dep6.jsonl").write_text(
        (HELMET_DIR / "kilt" / "nq-train-multikilt_1000_k3_dep6.jsonl").read_text()
    )
    tok = WsTokenizer()
    (s,) = helmet_samples(tok, "kilt_nq", tmp_path, max_prompt_tokens=500)
    assert prompt_tokens(tok, s) <= 500 and s.metadata["truncated"] is True
    assert "Document (Title: T0): passage number 0 text" in s.context and "(Title: T299)" not in s.context
    assert s.question == "Question: q?"


# ---------------------------------------------------------------------------------------------------- HELMET: ICL
def test_helmet_icl_banking77_demos_and_label_mapping() -> None:
    samples = helmet_samples(WsTokenizer(), "icl_banking77", HELMET_DIR, length=8192)
    train = records(HELMET_DIR / "icl" / "banking77" / "train.jsonl")
    test = records(HELMET_DIR / "icl" / "banking77" / "test.jsonl")
    label_of = {r["text"]: r["label"] for r in train}
    assert [s.id for s in samples] == ["0", "1", "2"]  # 3 test rows <= 500: all, in order
    for s, row in zip(samples, test):
        assert s.context.startswith('Use the provided mapping from the text to label to assign a label to the text. '
                                    'Only output "label: {label}" and nothing else. \n\n')  # fmt: skip
        assert s.question == row["text"] and s.answer_prefix == "\nlabel:" and s.chat_template is False
        pairs = re.findall(r"(?:^|\n\n)([^\n]+)\nlabel: (\d+)", s.context.split("nothing else. \n\n", 1)[1])
        assert len(pairs) == 360  # icl_banking77_360shot_balance at 8k
        # one random number per original label, consistent within the prompt, and the answer uses the same mapping
        mapping = {}
        for text, number in pairs:
            assert mapping.setdefault(label_of[text], number) == number
        assert len(set(mapping.values())) == len(mapping) == 3
        assert s.references == [mapping[row["label"]]]
        assert s.metric == "helmet_exact_match" and s.max_new_tokens == 20
    # balanced: 360 shots over 3 labels -> 120 per label
    counts: dict[int, int] = {}
    for text, _ in re.findall(r"(?:^|\n\n)([^\n]+)\nlabel: (\d+)", samples[0].context.split("else. \n\n", 1)[1]):
        counts[label_of[text]] = counts.get(label_of[text], 0) + 1
    assert counts == {41: 120, 59: 120, 32: 120}
    assert METRICS["helmet_exact_match"](" " + samples[0].references[0] + "\n", samples[0].references,
                                         samples[0].metadata) == 1.0  # fmt: skip


def test_helmet_icl_nlu_split() -> None:
    samples = helmet_samples(WsTokenizer(), "icl_nlu", HELMET_DIR)
    # train_test_split(test_size=0.1) of 10 rows: ceil(1.0) = 1 test row, 9 train rows
    assert len(samples) == 1
    shown = set(re.findall(r"utterance number \d+", samples[0].context))
    assert samples[0].question not in shown and len(shown) == 9


# ---------------------------------------------------------------------------------------------------- HELMET: LongQA
def test_helmet_infbench_prompt_demos_chat_and_plain() -> None:
    plain = helmet_samples(WsTokenizer(), "infbench_qa_eng", HELMET_DIR)
    chat = helmet_samples(WsTokenizer(chat=True), "infbench_qa_eng", HELMET_DIR)
    assert sorted(s.id for s in plain) == ["0", "1", "2", "3"]
    for s in plain:
        assert s.context.startswith(
            "You are given a story and a question. Answer the question as concisely as you can, using a single phrase "
            "if possible.\n\nFor example:\n\n[story text]\nQuestion: "
        )
        assert "\n\nNow, read the following story:\n\nStory " in s.context
        demo_qs = re.findall(r"\[story text\]\nQuestion: (.*)\n", s.context)
        assert len(demo_qs) == 2 and f"Where was treasure {s.id}?" not in demo_qs
        assert s.question == f"Question: Where was treasure {s.id}?"
        assert s.answer_prefix == "\n\nAnswer:" and s.chat_template is False
        assert s.metric == "helmet_rougeL_f1" and s.max_new_tokens == 10
    for s in chat:
        assert s.answer_prefix == "" and s.chat_template is True and s.metadata["helmet_output_prefix"] == ""


def test_helmet_longqa_truncation_marker(tmp_path: Path) -> None:
    (tmp_path / "infbench").mkdir()
    rows = [{"id": i, "context": " ".join(f"s{i}x{j}" for j in range(800)), "input": f"q{i}?", "answer": ["a"]}
            for i in range(3)]  # fmt: skip
    (tmp_path / "infbench" / "longbook_qa_eng.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = WsTokenizer(chat=True)
    samples = helmet_samples(tok, "infbench_qa_eng", tmp_path, max_prompt_tokens=300)
    for s in samples:
        assert prompt_tokens(tok, s) <= 300 and s.metadata["truncated"] is True
        assert s.context.endswith(" ... [the rest of the text is omitted]")
        assert f"s{s.id}x0 s{s.id}x1 " in s.context and f"s{s.id}x799" not in s.context


def test_helmet_narrativeqa_nested_rows() -> None:
    samples = helmet_samples(WsTokenizer(), "narrativeqa", HELMET_DIR)
    by_id = {s.id: s for s in samples}
    s = by_id["0"]
    assert s.context.startswith(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible.\n\nFor example:\n\nQuestion: "
    )
    assert s.context.endswith("Now, use the following story to answer the question:\n\nOnce upon a time Mary had "
                              "a lamb. The lamb was white.")  # fmt: skip
    assert s.question == "Question: What colour was the lamb?" and s.references == ["white", "It was white"]
    assert s.answer_prefix == "\nAnswer:" and s.metric == "helmet_f1" and s.max_new_tokens == 100
    assert len(re.findall(r"Question: .*\nAnswer: ", s.context)) == 2


def test_helmet_errors(tmp_path: Path) -> None:
    with pytest.raises(DapqError, match="data.tar.gz"):
        helmet_samples(WsTokenizer(), "kilt_hotpotqa", tmp_path)
    with pytest.raises(DapqError, match="no hub loader"):
        helmet_samples(WsTokenizer(), "kilt_nq", tmp_path, from_hub=True)
    with pytest.raises(DapqError, match="icl/banking77"):
        helmet_samples(WsTokenizer(), "icl_banking77", tmp_path)
    with pytest.raises(DapqError, match="longbook_qa_eng"):
        helmet_samples(WsTokenizer(), "infbench_qa_eng", tmp_path)
    with pytest.raises(DapqError, match="Unknown HELMET subset"):
        helmet_samples(WsTokenizer(), "icl_sst2", HELMET_DIR)
    with pytest.raises(DapqError, match="length must be one of"):
        helmet_samples(WsTokenizer(), "kilt_nq", HELMET_DIR, length=4096)
    with pytest.raises(DapqError, match="no data_dir"):
        helmet_samples(WsTokenizer(), "narrativeqa")
    assert set(HELMET_METRICS.values()) <= set(METRICS)
