"""Scoring functions for every benchmark task, each following one official definition (named in its docstring).

Every metric has the signature `metric(prediction, references, metadata) -> float` and returns a score in [0, 1]
for one sample (the runner multiplies the mean by 100). `Sample.metric` names an entry of `METRICS`. Use
`score_prediction` to score a sample: it applies LongBench's first-line rule when `metadata["first_line"]` is set.

    from dapq.tasks.metrics import METRICS, score_prediction
    score_prediction("qa_f1", "The Eiffel Tower", ["Eiffel Tower"], {})   # 1.0

Sources (the papers, and for what they leave to code, the benchmarks' published evaluation code, read for facts and
re-implemented here): RULER (arXiv 2404.06654, App. B; its synthetic-task constants), LongBench (arXiv 2308.14508,
Sec. 3; its metrics and eval scripts, with the `rouge` 1.0.1 package and fuzzywuzzy 0.18 they call), LongBench v2
(arXiv 2412.15204; its answer extraction), HELMET (arXiv 2410.02694, App. B; its post-processing); the
KV-compression papers' needle scoring (rouge-score's ROUGE-1 with the Porter stemmer). Tests: tests/test_metrics.py.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ..extras import require

Metric = Callable[[str, list[str], dict[str, Any]], float]

__all__ = [
    "METRICS",
    "SCORE_MAX",
    "Metric",
    "first_line",
    "score_prediction",
    "normalize_answer",
    "extract_choice",
    "row_score_max",
]

#: the best row score of a metric whose published scale is not 0-100 (rows are metric x 100)
SCORE_MAX = {"rouge1_x10": 10.0}


def row_score_max(metric: str | None) -> float:
    """The best score a row of `metric` can have: 100 unless `SCORE_MAX` says otherwise."""
    return SCORE_MAX.get(metric or "", 100.0)


# ---------------------------------------------------------------------------------------------------- helpers
def first_line(prediction: str) -> str:
    """The first line of a prediction after leading newlines, as LongBench's eval.py scores trec/triviaqa/samsum."""
    return prediction.lstrip("\n").split("\n")[0]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (LongBench and HELMET): lowercase, drop punctuation, drop articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCT = frozenset(string.punctuation)


def _best(values: list[float]) -> float:
    return float(max(values)) if values else 0.0


def _token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=4)
def _rouge_scorer(types: tuple[str, ...]) -> Any:
    rouge_scorer = require("rouge_score.rouge_scorer", "eval")
    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def _rouge_f(kind: str, prediction: str, reference: str) -> float:
    return float(_rouge_scorer((kind,)).score(reference, prediction)[kind].fmeasure)


# ---------------------------------------------------------------------------------------------------- NIAH
def _words(text: str) -> set[str]:
    return set(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def niah_word_recall(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """Needle word recall as KV-compression papers score Kamradt's needle test.

    |words(prediction) ∩ words(reference)| / |words(reference)|, where words() is the set of whitespace-separated
    words after lowercasing and removing ASCII punctuation; best over references.
    """
    scores = []
    for ref in references:
        ref_words = _words(ref)
        if ref_words:
            scores.append(len(_words(prediction) & ref_words) / len(ref_words))
    return _best(scores)


def rouge1(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """ROUGE-1 F-measure from Google's rouge-score (Porter stemmer on), as the needle testers in SnapKV/PyramidKV-style
    repositories compute it (`scorer.score(needle, response)['rouge1'].fmeasure`); best over references."""
    return _best([_rouge_f("rouge1", prediction, ref) for ref in references])


def rouge1_x10(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """KVCache-Factory's needle score (also LAQ's): ROUGE-1 F (rouge-score, Porter stemmer) of the stripped answer
    against the needle sentence, x 10, i.e. 0-10 per sample; an empty answer scores 0. Returned divided by 100 so
    that the runner's x 100 makes a row's score exactly F x 10, the published scale (`SCORE_MAX`: 10)."""
    answer = prediction.strip()
    return 0.0 if not answer else rouge1(answer, references, metadata) * 10 / 100


def rougeL(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:  # noqa: N802
    """ROUGE-L F-measure from Google's rouge-score (Porter stemmer on); best over references."""
    return _best([_rouge_f("rougeL", prediction, ref) for ref in references])


# ---------------------------------------------------------------------------------------------------- RULER
def _ruler_clean(prediction: str) -> str:
    # RULER evaluate.py postprocess_pred: strip, control characters -> newline, strip again.
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """RULER string_match_all: fraction of reference strings found (case-insensitive substring) in the prediction."""
    if not references:
        return 0.0
    pred = _ruler_clean(prediction).lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """RULER string_match_part (qa tasks): 1 if any reference string is a case-insensitive substring, else 0."""
    pred = _ruler_clean(prediction).lower()
    return _best([1.0 if r.lower() in pred else 0.0 for r in references])


# ---------------------------------------------------------------------------------------------------- LongBench v1
def qa_f1(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench qa_f1_score: token F1 after SQuAD normalisation (no special case for yes/no); best over answers."""
    pred_tokens = normalize_answer(prediction).split()
    return _best([_token_f1(pred_tokens, normalize_answer(ref).split()) for ref in references])


def _pltrdy_sentences(text: str) -> list[str]:
    # rouge 1.0.1 Rouge._get_scores: split on '.', keep non-empty pieces, squeeze their whitespace.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """Words of one longest common subsequence of x and y, reconstructed with rouge 1.0.1's tie-breaking."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:  # the official recursion, unrolled: match -> diagonal; up only if strictly better
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def _longbench_rouge_l_one(prediction: str, reference: str) -> float:
    hyp, ref = _pltrdy_sentences(prediction), _pltrdy_sentences(reference)
    if not hyp or not ref:  # the `rouge` package raises ValueError; LongBench catches it and scores 0
        return 0.0
    ref_vocab = {w for s in ref for w in s.split(" ")}
    hyp_vocab = {w for s in hyp for w in s.split(" ")}
    union: set[str] = set()  # exclusive=True: the union LCS is a set of word types accumulated over all sentences
    for r in ref:
        r_words = r.split(" ")
        for h in hyp:
            union.update(_lcs_words(r_words, h.split(" ")))
    recall = len(union) / len(ref_vocab)
    precision = len(union) / len(hyp_vocab)
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_l(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench rouge_score: the `rouge` package's (pltrdy, 1.0.1) summary-level ROUGE-L F, best over answers.

    Re-implemented exactly: text split into sentences on '.', words split on single spaces, no lowercasing or
    stemming, m/n = number of distinct words of reference/prediction, LCS union as a set of word types,
    F = 2PR / (P + R + 1e-8). An empty prediction (or one of only dots) scores 0, as the official try/except does.
    One difference: the official recursive LCS reconstruction overflows Python's stack for sentence pairs over about
    1000 words and then scores 0; this iterative version scores them.
    """
    return _best([_longbench_rouge_l_one(prediction, ref) for ref in references])


def _classification_one(prediction: str, truth: str, all_classes: list[str]) -> float:
    matches = [c for c in all_classes if c in prediction]
    # The official loop removes items from the list it iterates over, so the item after each removed one is skipped.
    # Reproduce that exactly: list.remove(first occurrence) and always advance the index.
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in truth and term != truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if truth in matches else 0.0


def classification_score(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench classification_score (trec) with `metadata["all_classes"]`; best over answers.

    Classes that occur as substrings of the prediction are collected; those that are proper substrings of the true
    class are dropped (with the official loop's skip-after-removal quirk); the score is 1/len(matches) if the true
    class is among them, else 0. The official difflib fallback sits behind `if em_match_list != 0`, which is always
    true for a list, so it never runs: no match scores 0 here as well.
    """
    all_classes = list(metadata.get("all_classes") or [])
    return _best([_classification_one(prediction, ref, all_classes) for ref in references])


def _share_of(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(1 for x in numbers if x == target) / len(numbers)


def count_score(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench count_score (passage_count): share of the integers in the prediction equal to the answer."""
    numbers = re.findall(r"\d+", prediction)
    return _best([_share_of(numbers, str(ref)) for ref in references])


def retrieval_score(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench retrieval_score (passage_retrieval_en): the answer is 'Paragraph N'; share of the integers in the
    prediction equal to N."""
    numbers = re.findall(r"\d+", prediction)
    scores = []
    for ref in references:
        found = re.findall(r"Paragraph (\d+)", ref)
        scores.append(_share_of(numbers, found[0]) if found else 0.0)
    return _best(scores)


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio`: equal strings 100, an empty one 0, else round(100 * Levenshtein ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    fuzz = require("rapidfuzz.fuzz", "eval")
    return int(round(fuzz.ratio(a, b)))


def code_sim(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench code_sim_score (lcc, repobench-p): fuzzy ratio of the first code line with the answer line.

    The first line (after leading newlines) that contains none of '`', '#', '//' anywhere (the official test is
    containment, not a prefix), or '' if none; then fuzzywuzzy's `fuzz.ratio / 100`. fuzzywuzzy with
    python-Levenshtein computes round(100 * Levenshtein.ratio), which rapidfuzz's `fuzz.ratio` equals before rounding;
    without python-Levenshtein fuzzywuzzy falls back to difflib, whose ratio can be slightly lower.
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return _best([_fuzz_ratio(line, ref) / 100 for ref in references])


# ---------------------------------------------------------------------------------------------------- LongBench v2
def extract_choice(response: str) -> str | None:
    """LongBench v2 pred.py extract_answer: drop '*', then 'The correct answer is (X)', then '... is X' (X in A-D)."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match is None:
        match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def longbench_v2_choice(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """LongBench v2 accuracy of one item: 1 if the extracted letter equals the answer letter (no answer scores 0)."""
    choice = extract_choice(prediction)
    return 1.0 if choice is not None and choice in references else 0.0


# ---------------------------------------------------------------------------------------------------- HELMET
def _helmet_parse(output: str, prefix: str) -> str:
    """HELMET utils.parse_output: the text after `prefix` up to the line end, else the first line; prefix stripped."""
    for pattern in (
        re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", re.IGNORECASE),
        re.compile(r"(?:^)(.*)(?:\n|$)"),
    ):
        found = pattern.search(output)
        if found is not None:
            return re.sub(f"^{re.escape(prefix)}", "", found[1].strip(), flags=re.IGNORECASE).strip()
    return output  # unreachable: the second pattern always matches


def _helmet_candidates(prediction: str, metadata: dict[str, Any]) -> list[str]:
    """The strings HELMET scores for one output: eval.py prepends the system template (e.g. 'Answer:') when no chat
    template is used; default_post_process takes the best of the raw output and the parsed one; ICL only the parsed."""
    output = str(metadata.get("helmet_output_prefix", "")) + prediction
    parsed = _helmet_parse(output, str(metadata.get("helmet_parse_prefix", "Answer:")))
    return [parsed] if metadata.get("helmet_parsed_only") else [output, parsed]


def _helmet_f1_one(prediction: str, truth: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(truth)
    if pred in ("yes", "no", "noanswer") and pred != ref:
        return 0.0
    if ref in ("yes", "no", "noanswer") and pred != ref:
        return 0.0
    return _token_f1(pred.split(), ref.split())


def helmet_exact_match(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """HELMET exact_match (ICL: the label after 'label:'): normalised equality, best over answers and candidates."""
    cands = _helmet_candidates(prediction, metadata)
    return _best([1.0 if normalize_answer(c) == normalize_answer(r) else 0.0 for c in cands for r in references])


def helmet_substring_exact_match(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """HELMET substring_exact_match (RAG): normalised answer is a substring of the normalised output."""
    cands = _helmet_candidates(prediction, metadata)
    return _best([1.0 if normalize_answer(r) in normalize_answer(c) else 0.0 for c in cands for r in references])


def helmet_f1(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:
    """HELMET f1 (narrativeqa): SQuAD token F1 where a yes/no/noanswer side must match exactly; best over answers."""
    cands = _helmet_candidates(prediction, metadata)
    return _best([_helmet_f1_one(c, r) for c in cands for r in references])


def helmet_rougeL_f1(prediction: str, references: list[str], metadata: dict[str, Any]) -> float:  # noqa: N802
    """HELMET rougeL_f1 (infbench_qa_eng): rouge-score ROUGE-L F with the Porter stemmer; best over answers."""
    cands = _helmet_candidates(prediction, metadata)
    return _best([_rouge_f("rougeL", c, r) for c in cands for r in references])


# ---------------------------------------------------------------------------------------------------- registry
METRICS: dict[str, Metric] = {
    "niah_word_recall": niah_word_recall,
    "rouge1": rouge1,
    "rouge1_x10": rouge1_x10,
    "rougeL": rougeL,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification_score": classification_score,
    "count_score": count_score,
    "retrieval_score": retrieval_score,
    "code_sim": code_sim,
    "longbench_v2_choice": longbench_v2_choice,
    "helmet_exact_match": helmet_exact_match,
    "helmet_substring_exact_match": helmet_substring_exact_match,
    "helmet_f1": helmet_f1,
    "helmet_rougeL_f1": helmet_rougeL_f1,
}


def score_prediction(
    metric: str, prediction: str, references: list[str], metadata: dict[str, Any] | None = None
) -> float:
    """Score one prediction with `METRICS[metric]`, first applying `first_line` when `metadata["first_line"]`."""
    from ..errors import DapqError

    if metric not in METRICS:
        raise DapqError(f"Unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}.")
    metadata = metadata or {}
    if metadata.get("first_line"):
        prediction = first_line(prediction)
    return float(METRICS[metric](prediction, list(references), metadata))
