"""RULER's generators for the needle, variable-tracking and word-frequency tasks (arXiv 2404.06654, Sec. 3 and
App. B): templates, word sources, haystacks and the fitting of each prompt to its target length. `dapq.tasks.ruler`
is the entry point (`ruler_samples`); qa_1/qa_2 are `dapq.tasks.ruler_qa`."""

from __future__ import annotations

import functools
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import haystack_text
from ..errors import DapqError
from ..extras import require
from ..prompts import fit_units, prompt_tokens, tokenizer_cache

TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, 40))]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # noise | essay | needle
    type_k: str  # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH_CONFIGS = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_k=4, num_q=4),
}


# ---------------------------------------------------------------------------------------------------- word sources
@functools.lru_cache(maxsize=4)
def _wonderwords(name: str) -> tuple[str, ...]:
    random_word = require("wonderwords.random_word", "eval")  # RULER's word lists
    return tuple(random_word._get_words_from_text_file(name))


def _cwe_vocabulary() -> list[str]:
    """RULER's CWE word list: wonderwords nouns + adjectives + verbs, deduplicated, sorted."""
    return sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt") + _wonderwords("verblist.txt")))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":  # an "{adjective}-{noun}" key, uniform over the pairs as in RULER
        return f"{rng.choice(_wonderwords('adjectivelist.txt'))}-{rng.choice(_wonderwords('nounlist.txt'))}"
    raise DapqError(f"unknown needle type {kind!r}")


def _distinct(rng: random.Random, kind: str, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _random_value(rng, kind)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


# ---------------------------------------------------------------------------------------------------- essay haystack
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@functools.lru_cache(maxsize=1)
def _essay_words() -> tuple[list[str], np.ndarray]:
    """The essays as RULER uses them (whitespace collapsed, split on spaces) and the word indices that start a
    sentence (after a word ending in . ! or ?, closing quotes or brackets allowed)."""
    words = re.sub(r"\s+", " ", haystack_text()).strip().split(" ")
    starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if _SENTENCE_END.search(w)]
    return words, np.asarray(starts, dtype=np.int64)


def _essay_counts(tokenizer: Any) -> np.ndarray:
    """cum[n] ~ tokens of the first n essay words joined by spaces (one tokenizer call, cached per tokenizer)."""
    cache = tokenizer_cache(tokenizer)
    if "ruler_essay_cum" not in cache:
        words, _ = _essay_words()
        if getattr(tokenizer, "is_fast", False):
            text = " ".join(words)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            token_starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
            word_starts = np.concatenate([[0], np.cumsum([len(w) + 1 for w in words])])
            # a token that starts at the space before word n belongs to word n
            bounds = np.maximum(word_starts - 1, 0)
            bounds[-1] = len(text) + 1
            cum = np.searchsorted(token_starts, bounds, side="left")
        else:  # slow tokenizers: count each word with its leading space
            ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
            cum = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
        cache["ruler_essay_cum"] = cum.astype(np.int64)
    return cache["ruler_essay_cum"]


def _essay_est(tokenizer: Any) -> Callable[[int], float]:
    cum = _essay_counts(tokenizer)
    w, total = len(cum) - 1, int(cum[-1])
    return lambda n: float((n // w) * total + cum[n % w])


def _essay_slice(a: int, b: int) -> list[str]:
    words, _ = _essay_words()
    w = len(words)
    return [words[i % w] for i in range(a, b)] if b > w else words[a:b]


def _essay_context(n: int, needles: list[str], depths: list[int]) -> str:
    """The first n words (repeating the essays if needed) with needles at sentence starts: needle i goes before
    sentence int(num_sentences * depth_i / 100), as RULER does with its sentence tokenizer."""
    words, starts = _essay_words()
    reps = n // len(words) + 1
    all_starts = np.concatenate([starts + k * len(words) for k in range(reps)])
    all_starts = all_starts[all_starts < n]
    cuts = []
    for depth in depths:
        k = int(len(all_starts) * depth / 100)
        cuts.append(int(all_starts[k]) if k < len(all_starts) else n)
    parts, prev = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda x: x[0]):
        if cut > prev:
            parts.append(" ".join(_essay_slice(prev, cut)))
        parts.append(needle)
        prev = max(prev, cut)
    if n > prev:
        parts.append(" ".join(_essay_slice(prev, n)))
    return " ".join(parts)


def _line_context(lines: list[str], inserts: list[str], depths: list[int]) -> str:
    """Lines joined by newlines with `inserts` at line int(n * depth / 100), in order (equal positions keep order)."""
    n = len(lines)
    out = list(lines)
    placed = sorted(((int(n * d / 100), i) for i, d in enumerate(depths)), reverse=True)
    for pos, i in placed:
        out.insert(pos, inserts[i])
    return "\n".join(out)


def _line_est(tokenizer: Any, line: str) -> Callable[[int], float]:
    per_line = len(tokenizer.encode(line, add_special_tokens=False)) + 1  # + the newline
    return lambda n: float(n * per_line)


# ---------------------------------------------------------------------------------------------------- the generator
@dataclass
class Parts:
    context: str
    question: str
    prefix: str
    references: list[str]
    metadata: dict[str, Any]


def fit_parts(
    tokenizer: Any,
    build: Callable[[int], Parts],
    est: Callable[[int], float],
    limit: int,
    n_min: int,
    n_max: int,
    chat_template: bool | None,
    what: str,
) -> tuple[Parts, int, int]:
    def measure(n: int) -> int:
        p = build(n)
        return prompt_tokens(tokenizer, p.context, p.question, p.prefix, chat_template)

    n, total = fit_units(measure, est, limit, n_min, n_max, what)
    return build(n), n, total


def niah_parts(tokenizer: Any, task: str, length: int, seed: int, chat_template: bool | None) -> tuple[Parts, int, int]:
    cfg = NIAH_CONFIGS[task]
    rng = random.Random(seed)
    taken: set[str] = set()
    keys = _distinct(rng, cfg.type_k, cfg.num_k, taken)
    values = [_distinct(rng, cfg.type_v, cfg.num_v, taken) for _ in keys]
    needles = [NEEDLE.format(type_v=cfg.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    chosen = sorted(rng.sample(range(cfg.num_k), cfg.num_q))
    queries = [keys[i] for i in chosen]
    answers = [v for i in chosen for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, cfg.type_v
    if cfg.num_q * cfg.num_v == 1:  # RULER's singular wording
        template, prefix = (
            s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
            for s in (template, prefix)
        )
        type_v = type_v[:-1]
    head, tail = template.split("{context}")
    intro = head.format(type_v=type_v)
    question = tail.lstrip("\n").format(type_v=type_v, query=query)
    prefix = prefix.format(type_v=type_v, query=query)
    limit = length - TOKENS_TO_GENERATE["niah"]
    meta = {"depths": depths, "haystack": cfg.haystack, "keys": keys, "queries": queries}

    if cfg.haystack == "essay":
        est = _essay_est(tokenizer)

        def context(n: int) -> str:
            return _essay_context(n, needles, depths)

        n_max = 40 * limit + 1000
    elif cfg.haystack == "noise":
        est = _line_est(tokenizer, NOISE)

        def context(n: int) -> str:
            return _line_context([NOISE] * n, needles, depths)

        n_max = limit + 100
    else:  # distractor needles with fresh keys and values of the same types
        lines = [
            NEEDLE.format(type_v=cfg.type_v, key=k, value=v)
            for k, v in zip(
                _distinct(rng, cfg.type_k, limit // 8 + 16, taken), _distinct(rng, cfg.type_v, limit // 8 + 16, taken)
            )
        ]
        counts = [len(x) + 1 for x in tokenizer(lines, add_special_tokens=False)["input_ids"]]
        cum = np.concatenate([[0], np.cumsum(counts)])

        def est(n: int) -> float:
            return float(cum[n])

        def context(n: int) -> str:
            return _line_context(lines[:n], needles, depths)

        n_max = len(lines)

    def build(n: int) -> Parts:
        return Parts(intro + context(n), question, prefix, answers, meta)

    return fit_parts(tokenizer, build, est, limit, 0, n_max, chat_template, f"ruler/{task}")


def _vt_chain(rng: random.Random, hops: int, taken: set[str]) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, chain, value


VT_HOPS = 4
VT_ICL_NOISE_LINES = 10


def vt_parts(tokenizer: Any, length: int, seed: int, chat_template: bool | None) -> tuple[Parts, int, int]:
    """One chain of 4 hops (5 variables) in noise lines, after one solved in-context example (RULER's VT)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    names, chain, value = _vt_chain(rng, VT_HOPS, taken)
    icl_names, icl_chain, icl_value = _vt_chain(rng, VT_HOPS, taken)
    while icl_value == value:
        icl_value = str(rng.randint(10000, 99999))
        icl_chain[0] = f"VAR {icl_names[0]} = {icl_value}"
    icl_depths = sorted(rng.sample(DEPTHS, len(icl_chain)))
    depths = sorted(rng.sample(DEPTHS, len(chain)))
    num_v = VT_HOPS + 1
    example = (
        VT_INTRO
        + _vt_lines(VT_ICL_NOISE_LINES, icl_chain, icl_depths)
        + "\n"
        + VT_QUESTION.format(query=icl_value)
        + VT_PREFIX.format(num_v=num_v, query=icl_value)
        + " ".join(icl_names)
    )
    question = VT_QUESTION.format(query=value)
    prefix = VT_PREFIX.format(num_v=num_v, query=value)
    meta = {"depths": depths, "chain": chain}

    def build(n: int) -> Parts:
        return Parts(example + "\n\n" + VT_INTRO + _vt_lines(n, chain, depths), question, prefix, names, meta)

    limit = length - TOKENS_TO_GENERATE["vt"]
    return fit_parts(tokenizer, build, _line_est(tokenizer, NOISE), limit, 0, limit + 100, chat_template, "ruler/vt")


def _vt_lines(n: int, chain: list[str], depths: list[int]) -> str:
    """Noise lines with chain line j at line int(n * depth_j / 100) + j, so the chain keeps its order."""
    out = [NOISE] * n
    for j, (line, depth) in enumerate(zip(chain, depths)):
        out.insert(int(n * depth / 100) + j, line)
    return "\n".join(out)


def _word_counts(tokenizer: Any, words: list[str]) -> np.ndarray:
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return np.asarray([len(x) for x in ids], dtype=np.int64)


def _index_counts(tokenizer: Any, m: int) -> np.ndarray:
    """cum[i] ~ tokens of the list numbers " 1.", ..., " i." (grown and cached per tokenizer)."""
    cache = tokenizer_cache(tokenizer)
    cum = cache.get("ruler_index_cum", np.zeros(1, dtype=np.int64))
    if len(cum) <= m:
        start, stop = len(cum), max(m + 1, 2 * len(cum), 4096)
        more = _word_counts(tokenizer, [f"{i}." for i in range(start, stop)])
        cum = np.concatenate([cum, cum[-1] + np.cumsum(more)])
        cache["ruler_index_cum"] = cum
    return cum


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_parts(tokenizer: Any, length: int, seed: int, chat_template: bool | None) -> tuple[Parts, int, int]:
    """10 common words (x30, others x3; x6 and x1 under 4k tokens) in a numbered list, after one solved example
    (20 words x3/x1 under 4k, else 40 words x10/x3), as RULER's common_words_extraction.py."""
    rng = random.Random(seed)
    vocab = _cwe_vocabulary()
    perm = list(vocab)
    rng.shuffle(perm)
    small = length < 4096
    cf, uf = (6, 1) if small else (30, 3)
    ex_n, ex_cf, ex_uf = (20, 3, 1) if small else (40, 10, 3)
    ex_words = perm[-ex_n:]
    ex_list = ex_words[:10] * ex_cf + ex_words[10:] * ex_uf
    random.Random(rng.getrandbits(64)).shuffle(ex_list)
    example = CWE_INTRO + _numbered(ex_list) + "\n" + CWE_QUESTION + CWE_PREFIX + " " + _numbered(ex_words[:10])
    shuffle_seed = rng.getrandbits(64)
    pool = perm[:-ex_n]
    cache = tokenizer_cache(tokenizer)
    if "ruler_cwe_counts" not in cache:
        cache["ruler_cwe_counts"] = dict(zip(vocab, _word_counts(tokenizer, vocab).tolist()))
    word_tokens = cache["ruler_cwe_counts"]
    weights = np.asarray([word_tokens[w] * (cf if i < 10 else uf) for i, w in enumerate(pool)], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(weights)])
    index_cum = _index_counts(tokenizer, 10 * cf + len(pool) * uf)

    def items(n: int) -> int:
        return min(n, 10) * cf + max(n - 10, 0) * uf

    def est(n: int) -> float:
        return float(cum[n] + index_cum[items(n)])

    def build(n: int) -> Parts:
        chosen = pool[:n]
        word_list = chosen[:10] * cf + chosen[10:] * uf
        random.Random(shuffle_seed).shuffle(word_list)
        context = example + "\n" + CWE_INTRO + _numbered(word_list)
        return Parts(context, CWE_QUESTION, CWE_PREFIX, chosen[:10], {"freq_cw": cf, "freq_ucw": uf, "num_words": n})

    limit = length - TOKENS_TO_GENERATE["cwe"]
    return fit_parts(tokenizer, build, est, limit, 10, len(pool), chat_template, "ruler/cwe")


FWE_ALPHA = 2.0
FWE_VOCAB = 2000
FWE_WORD_LEN = 6


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi**2 / 6
    k = np.arange(1, 100_001, dtype=np.float64)
    return float(np.sum(k**-alpha) + 100_000 ** (1 - alpha) / (alpha - 1))


def fwe_parts(tokenizer: Any, length: int, seed: int, chat_template: bool | None) -> tuple[Parts, int, int]:
    """Coded 6-letter words with Zipf(alpha=2) counts over 2000 words; rank 1 is the '....' noise, the answer is
    ranks 2-4 (RULER's freq_words_extraction.py)."""
    rng = random.Random(seed)
    vocab_set: set[str] = set()
    while len(vocab_set) < FWE_VOCAB:
        vocab_set.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)))
    vocab = sorted(vocab_set)
    rng.shuffle(vocab)
    vocab[0] = "...."
    shuffle_seed = rng.getrandbits(64)
    shares = np.arange(1, FWE_VOCAB + 1, dtype=np.float64) ** -FWE_ALPHA / _zeta(FWE_ALPHA)
    word_tokens = _word_counts(tokenizer, vocab)

    def counts(n: int) -> np.ndarray:
        return (n * shares).astype(np.int64)

    def est(n: int) -> float:
        return float(counts(n) @ word_tokens)

    def build(n: int) -> Parts:
        words = [w for w, c in zip(vocab, counts(n).tolist()) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        meta = {"alpha": FWE_ALPHA, "num_words": n}
        return Parts(FWE_INTRO + " ".join(words), FWE_QUESTION, FWE_PREFIX, vocab[1:4], meta)

    limit = length - TOKENS_TO_GENERATE["fwe"]
    # at least 100 words so that ranks 2-4 are strictly more frequent than rank 5
    return fit_parts(tokenizer, build, est, limit, 100, 100 * limit + 1000, chat_template, "ruler/fwe")
