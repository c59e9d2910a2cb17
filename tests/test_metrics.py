"""Every benchmark metric against values worked out by hand from the official definitions.

Run: python -m pytest -q tests/test_metrics.py

Each expected number is written with its arithmetic. The definitions are those named in each metric's docstring
(RULER constants.py, LongBench metrics.py / eval.py with the `rouge` 1.0.1 and fuzzywuzzy packages, LongBench v2
pred.py, HELMET utils.py / data.py, rouge-score with the Porter stemmer for the needle scores).
"""

from __future__ import annotations

import random

import pytest

from dapq.errors import DapqError
from dapq.tasks.metrics import METRICS, extract_choice, first_line, normalize_answer, score_prediction

NO_META: dict = {}
NEEDLE = "eat a sandwich and sit in Dolores Park on a sunny day."


def m(name: str, pred: str, refs: list[str], meta: dict | None = None) -> float:
    return METRICS[name](pred, refs, meta or {})


# ---------------------------------------------------------------------------------------------------- helpers
def test_first_line_and_normalisation() -> None:
    assert first_line("\n\nParis\nLondon") == "Paris"
    assert first_line("") == ""
    # lower -> drop punctuation -> drop articles -> squeeze
    assert normalize_answer("The  Eiffel-Tower, an icon!") == "eiffeltower icon"


# ---------------------------------------------------------------------------------------------------- NIAH
def test_niah_word_recall() -> None:
    # words(needle) = {eat, a, sandwich, and, sit, in, dolores, park, on, sunny, day}: 11 (the 'a' twice counts once)
    # words(pred) = {eat, a, sandwich, in, the, park}; shared {eat, a, sandwich, in, park} = 5 -> 5/11
    assert m("niah_word_recall", "Eat a sandwich in the park.", [NEEDLE]) == pytest.approx(5 / 11)
    assert m("niah_word_recall", "EAT A SANDWICH AND SIT IN DOLORES PARK ON A SUNNY DAY!", [NEEDLE]) == 1.0
    assert m("niah_word_recall", "", [NEEDLE]) == 0.0


def test_rouge1_x10_is_the_published_needle_score() -> None:
    # KVCache-Factory: scorer.score(needle, response)['rouge1'].fmeasure * 10, against the whole needle sentence.
    # ref unigrams (21): the best thing to do in san francisco is eat a sandwich and sit in dolores park on a sunny
    # day; pred (12): eat a sandwich and sit in dolores park on a sunny day, all 12 in ref (a x2, in x1 clipped)
    # P = 12/12, R = 12/21 -> F = 2 * (12/21) / (33/21) = 24/33 = 8/11; x 10 = 80/11 per row (= 100 x the metric)
    sentence = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    row = 100 * score_prediction(
        "rouge1_x10", " eat a sandwich and sit in Dolores Park on a sunny day.", [sentence], {}
    )
    assert row == pytest.approx(80 / 11)
    assert 100 * m("rouge1_x10", sentence, [sentence]) == pytest.approx(10.0)
    assert m("rouge1_x10", "  \n", [sentence]) == 0.0

    from dapq.tasks.metrics import row_score_max

    assert row_score_max("rouge1_x10") == 10.0 and row_score_max("niah_word_recall") == 100.0


def test_rouge1_and_rougeL() -> None:
    # unigrams pred [the cat sat], ref [the cat sat on the mat]: overlap min-counts the 1 + cat 1 + sat 1 = 3
    # P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5 = 2/3
    assert m("rouge1", "the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # Porter stemmer on (tokens longer than 3 chars): running -> run, dogs -> dog; all 2 match -> F = 1
    assert m("rouge1", "running dogs", ["run dog"]) == pytest.approx(1.0)
    # LCS("cat the sat", "the cat sat") = 2 -> P = R = 2/3 -> F = 2/3
    assert m("rougeL", "cat the sat", ["the cat sat"]) == pytest.approx(2 / 3)
    # best over references
    assert m("rougeL", "cat the sat", ["dog", "the cat sat"]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------- RULER
def test_string_match_all_and_part() -> None:
    # 2 of the 3 references occur in the prediction -> 2/3
    assert m("string_match_all", "The numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert m("string_match_all", "the word is abc", ["ABC"]) == 1.0  # case-insensitive
    assert m("string_match_all", "nothing", []) == 0.0
    # part: 1 if any reference occurs
    assert m("string_match_part", "It is london.", ["Paris", "London"]) == 1.0
    assert m("string_match_part", "It is Rome.", ["Paris", "London"]) == 0.0
    # RULER post-processing turns control characters into newlines before matching
    assert m("string_match_all", "12\x0034", ["12\n34"]) == 1.0


# ---------------------------------------------------------------------------------------------------- LongBench v1
def test_qa_f1() -> None:
    # pred -> "eiffel tower in paris" (4 tokens); ref "eiffel tower" (2): common 2 -> P = 2/4, R = 2/2
    # F = 2 * 0.5 * 1 / 1.5 = 2/3; the second ref "Paris": common 1 -> P = 1/4, R = 1 -> F = 0.4; max = 2/3
    assert m("qa_f1", "The Eiffel Tower, in Paris!", ["Eiffel Tower", "Paris"]) == pytest.approx(2 / 3)
    assert m("qa_f1", "yes", ["no"]) == 0.0
    assert m("qa_f1", "", ["no"]) == 0.0


def test_rouge_l_longbench() -> None:
    # rouge 1.0.1: sentences split on '.': hyp ["the cat sat", "a dog ran"], ref ["the cat ran"]
    # m = |{the, cat, ran}| = 3, n = |{the, cat, sat, a, dog, ran}| = 6
    # LCS(ref, "the cat sat") = [the, cat]; LCS(ref, "a dog ran") = [ran]; union {the, cat, ran} = 3
    # R = 3/3, P = 3/6 -> F = 2 * 0.5 * 1 / (1.5 + 1e-8)
    assert m("rouge_l", "the cat sat. a dog ran", ["the cat ran"]) == pytest.approx(1 / 1.5, abs=1e-7)
    # no lowercasing: {The, cat} vs {the, cat}: LCS [cat] -> P = R = 1/2 -> F = 0.5 / (1 + 1e-8)
    assert m("rouge_l", "The cat", ["the cat"]) == pytest.approx(0.5, abs=1e-7)
    # the union LCS is a set of word types over all reference sentences: ref ["a b", "a c"], hyp ["a b c"]
    # m = |{a, b, c}| = 3, n = 3; LCS = [a, b] and [a, c]; union {a, b, c} = 3 -> P = R = 1 -> F = 2 / (2 + 1e-8)
    assert m("rouge_l", "a b c", ["a b. a c"]) == pytest.approx(1.0, abs=1e-7)
    # empty prediction (or only dots): the package raises, LongBench catches and scores 0
    assert m("rouge_l", "", ["the cat"]) == 0.0
    assert m("rouge_l", "...", ["the cat"]) == 0.0


def test_classification_score() -> None:
    classes = ["Animal", "Animal sound", "Color"]
    # matches [Animal, Animal sound]; 'Animal' is a proper substring of the truth -> removed; [Animal sound] -> 1/1
    assert m("classification_score", "It is an Animal sound", ["Animal sound"], {"all_classes": classes}) == 1.0
    # matched 'Animal' is not the truth 'Color' -> 0
    assert m("classification_score", "Animal", ["Color"], {"all_classes": classes}) == 0.0
    # no class matched -> 0 (the official difflib fallback is unreachable: `list != 0` is always true)
    assert m("classification_score", "no idea", ["Color"], {"all_classes": classes}) == 0.0
    # the official loop removes from the list it iterates: matches [Col, Colo, Color, Other]; 'Col' removed, the
    # iterator then skips 'Colo' (now at the visited index), keeps 'Color' and 'Other' -> [Colo, Color, Other] -> 1/3
    quirky = ["Col", "Colo", "Color", "Other"]
    assert m("classification_score", "Color Other", ["Color"], {"all_classes": quirky}) == pytest.approx(1 / 3)


def test_count_and_retrieval_scores() -> None:
    # integers [12, 13, 12]; two equal the answer 12 -> 2/3
    assert m("count_score", "There are 12 unique paragraphs, not 13 or 12", ["12"]) == pytest.approx(2 / 3)
    assert m("count_score", "I do not know", ["12"]) == 0.0
    # answer 'Paragraph 5' -> id 5; integers [5, 7] -> 1/2
    assert m("retrieval_score", "Paragraph 5 or Paragraph 7", ["Paragraph 5"]) == 0.5
    assert m("retrieval_score", "Paragraph 5", ["Paragraph 5"]) == 1.0
    assert m("retrieval_score", "none", ["Paragraph 5"]) == 0.0


def test_code_sim() -> None:
    # lines after lstrip('\n'): ['# comment', '    return x + 1', 'foo()']; the first without '#', '`', '//' is
    # '    return x + 1', equal to the answer -> 100 / 100
    assert m("code_sim", "\n# comment\n    return x + 1\nfoo()", ["    return x + 1"]) == 1.0
    # containment, not prefix: 'x = 1  # set x' is skipped -> 'y = 2'
    assert m("code_sim", "x = 1  # set x\ny = 2", ["y = 2"]) == 1.0
    # 'return a' vs 'return b': 8 + 8 chars, LCS 7 -> Levenshtein ratio 2 * 7 / 16 = 0.875 -> round(87.5) = 88
    assert m("code_sim", "```python\nreturn a", ["return b"]) == pytest.approx(0.88)
    # no usable line -> '' -> fuzzywuzzy returns 0 for an empty string
    assert m("code_sim", "# only a comment", ["return b"]) == 0.0


# ---------------------------------------------------------------------------------------------------- LongBench v2
def test_longbench_v2_choice() -> None:
    assert extract_choice("The correct answer is (B)") == "B"
    assert extract_choice("**The correct answer is C**") == "C"  # '*' removed first
    # the '(X)' form is searched first, anywhere in the response
    assert extract_choice("The correct answer is B. Or: The correct answer is (C)") == "C"
    assert extract_choice("I think B") is None
    assert m("longbench_v2_choice", "The correct answer is (B)", ["B"]) == 1.0
    assert m("longbench_v2_choice", "The correct answer is (A)", ["B"]) == 0.0
    assert m("longbench_v2_choice", "B", ["B"]) == 0.0  # nothing extracted scores 0


# ---------------------------------------------------------------------------------------------------- HELMET
ICL_META = {"helmet_output_prefix": "label:", "helmet_parse_prefix": "label:", "helmet_parsed_only": True}
RAG_META = {"helmet_output_prefix": "Answer:", "helmet_parse_prefix": "Answer:", "helmet_parsed_only": False}
CHAT_META = {"helmet_output_prefix": "", "helmet_parse_prefix": "Answer:", "helmet_parsed_only": False}


def test_helmet_exact_match_icl() -> None:
    # eval.py prepends 'label:' -> 'label: 42\nfoo'; parse_output takes ' 42' up to the newline -> '42'
    assert m("helmet_exact_match", " 42\nfoo", ["42"], ICL_META) == 1.0
    assert m("helmet_exact_match", " 4", ["42"], ICL_META) == 0.0
    # a model that repeats the prefix: 'label: label: 7' -> ' label: 7' -> stripped, prefix removed again -> '7'
    assert m("helmet_exact_match", " label: 7", ["7"], ICL_META) == 1.0


def test_helmet_substring_exact_match_rag() -> None:
    # normalize('paris') in normalize('Answer: The capital is Paris.') = 'answer capital is paris'
    assert m("helmet_substring_exact_match", " The capital is Paris.", ["paris"], RAG_META) == 1.0
    assert m("helmet_substring_exact_match", " The capital is Paris.", ["Lyon"], RAG_META) == 0.0
    # the raw output counts too (best of raw and parsed): 'London' only appears after the first line
    assert m("helmet_substring_exact_match", " Paris\nQuestion: x\nAnswer: London", ["London"], RAG_META) == 1.0


def test_helmet_f1_and_rougeL_f1() -> None:
    # 'a red car' -> [red, car]; 'red car parked' -> [red, car, parked]: P = 1, R = 2/3 -> F = (4/3) / (5/3) = 0.8
    assert m("helmet_f1", "a red car", ["red car parked"], CHAT_META) == pytest.approx(0.8)
    # a yes/no/noanswer side must match exactly
    assert m("helmet_f1", "yes", ["no"], CHAT_META) == 0.0
    assert m("helmet_f1", "yes", ["yes"], CHAT_META) == 1.0
    # raw 'answer dog' vs 'dog': P = 1/2, R = 1 -> 2/3; parsed 'the dog' -> 'dog' -> 1; best = 1
    assert m("helmet_f1", "Answer: the dog", ["dog"], CHAT_META) == 1.0
    # LCS('cat the sat', 'the cat sat') = 2 -> P = R = 2/3 -> F = 2/3
    assert m("helmet_rougeL_f1", "cat the sat", ["the cat sat"], CHAT_META) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------- registry
def test_score_prediction_first_line_and_unknown_metric() -> None:
    # first line 'Paris' vs 'London' -> 0; whole text [paris, london] vs [london]: P = 1/2, R = 1 -> 2/3
    assert score_prediction("qa_f1", "\nParis\nLondon", ["London"], {"first_line": True}) == 0.0
    assert score_prediction("qa_f1", "\nParis\nLondon", ["London"], {}) == pytest.approx(2 / 3)
    with pytest.raises(DapqError, match="Unknown metric"):
        score_prediction("bleu", "x", ["x"])


def test_every_metric_stays_in_unit_interval() -> None:
    rng = random.Random(0)
    vocab = ["the", "cat", "Paris", "12", "Paragraph 3", "label:", "Answer:", "#", "(B)", "The correct answer is", "\n"]
    meta = {"all_classes": ["cat", "Paris"], **RAG_META}
    for _ in range(60):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        for name, fn in METRICS.items():
            value = fn(pred, refs, meta)
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, pred, refs, value)
