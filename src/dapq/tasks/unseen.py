"""The unseen-kinds set: needles of answer kinds and a haystack that neither training recipe nor RULER uses, to test
whether learned queries (or any estimator) hold beyond the task shapes they were fitted to (issue: learned queries
for any model; LookaheadKV, arXiv 2603.10899, Sec. 5 reports the same kind of held-out check).

Haystack: Python's own bundled documentation (`pydoc_data.topics`, the text `help()` shows: reference prose with
code), which the project reserves for evaluation: no training recipe reads it, and it is not an essay. Kinds
(`UNSEEN_KINDS`), each one fact sentence inserted at a sentence start of a random depth:
- `name`: who held a post ("The lighthouse keeper of Corvel Island in 1932 was Ottilie Brandvold."), a full name;
- `code`: an access code of letters and digits with a dash ("QX-48B7");
- `date`: a day, month and year ("14 March 1897");
- `twofact`: a fact spread over two sentences at two depths ("Mirela owns the teal kayak." ... "The teal kayak is
  kept at pier 17."): the question names the person, the answer is in the other sentence.
Names, places and objects are drawn from lists of this module that no training kind or RULER task uses. Sample i of
a (kind, length) is generated from seed + i; the prompt (chat template and question included, measured with
`dapq.prompts.build_prompt`) plus the answer's tokens fits `length`. Metric: RULER's string_match_all (the answer
found in the output, case-insensitive).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from ..errors import DapqError
from .registry import Family, Task, TaskArgs, lengths_of, parse_lengths, select_tasks
from .sample import Sample

UNSEEN_KINDS = ("name", "code", "date", "twofact")
METRIC = "string_match_all"
ANSWER_TOKENS = 24

FIRST = ("Ottilie", "Bastian", "Ingeborg", "Lucian", "Marit", "Tiberius", "Wilhelmina", "Caspar", "Sunniva", "Aurelio",
         "Henrike", "Leander", "Rosalind", "Severin", "Thekla", "Valentin")  # fmt: skip
LAST = ("Brandvold", "Kettleby", "Orsini", "Pemberton", "Quist", "Rasmussen", "Strand", "Tolliver", "Underhill",
        "Vasquez", "Whitcombe", "Yardley", "Zeller", "Abernathy", "Castellan", "Dunmore")  # fmt: skip
POSTS = ("lighthouse keeper", "harbour master", "head librarian", "station chief", "orchard warden", "bell ringer")
ISLANDS = ("Corvel Island", "Mossfjord", "Halden Reach", "Saltmere", "Tarn Holm", "Wrenfield", "Osterby", "Calder Bay")
ARCHIVES = ("north archive", "glass vault", "map room", "seed store", "east tower", "cold cellar", "signal hut")
BRIDGES = ("Halvorsen bridge", "Larkspur tunnel", "Ebbing canal", "Greyfriar viaduct", "Copperline railway")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
COLOURS = ("teal", "ochre", "violet", "copper", "sage", "coral")
BOATS = ("kayak", "dinghy", "canoe", "rowboat", "sloop", "punt")


def haystack_words() -> list[str]:
    """The words of Python's bundled documentation topics (sorted by topic name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation
        raise DapqError("The unseen-kinds set needs Python's pydoc_data (part of a standard Python).") from None
    return " ".join(topics[k] for k in sorted(topics)).split()


def fact(kind: str, rng: random.Random) -> tuple[list[str], str, str]:
    """(fact sentences, question, answer) of one sample of `kind`."""
    if kind == "name":
        who, post, where = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(POSTS), rng.choice(ISLANDS)
        year = rng.randrange(1850, 1990)
        return ([f"The {post} of {where} in {year} was {who}."], f"Who was the {post} of {where} in {year}?", who)
    if kind == "code":
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        code = "".join(rng.choice(letters) for _ in range(2)) + "-" + str(rng.randrange(10, 100))
        code += rng.choice(letters) + str(rng.randrange(1, 10))
        place = rng.choice(ARCHIVES)
        return ([f"The access code for the {place} is {code}."], f"What is the access code for the {place}?", code)
    if kind == "date":
        bridge = rng.choice(BRIDGES)
        date = f"{rng.randrange(1, 29)} {rng.choice(MONTHS)} {rng.randrange(1820, 1960)}"
        return ([f"The {bridge} was opened on {date}."], f"On what date was the {bridge} opened?", date)
    if kind == "twofact":
        who, boat = rng.choice(FIRST), f"{rng.choice(COLOURS)} {rng.choice(BOATS)}"
        pier = str(rng.randrange(11, 99))
        return (
            [f"{who} owns the {boat}.", f"The {boat} is kept at pier {pier}."],
            f"At which pier is the boat that {who} owns kept?",
            pier,
        )
    raise DapqError(f"Unknown unseen kind {kind!r}; choose from {', '.join(UNSEEN_KINDS)}.")


def unseen_samples(tokenizer: Any, kind: str, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`n` samples of `kind` fitted to `length` tokens (sample i from seed + i)."""
    from ..prompts import build_prompt

    if kind not in UNSEEN_KINDS:
        raise DapqError(f"Unknown unseen kind {kind!r}; choose from {', '.join(UNSEEN_KINDS)}.")
    words = haystack_words()
    out = []
    for i in range(n):
        rng = random.Random(f"unseen/{kind}/{length}/{seed + i}")
        sentences, question, answer = fact(kind, rng)
        question += " Answer with the words of the text."
        start = rng.randrange(0, len(words) - 8000)
        n_words = int(length * 0.6)
        depths = sorted(rng.random() for _ in sentences)
        while True:
            chunk = words[start : start + n_words]
            starts = [j for j in range(1, len(chunk)) if chunk[j - 1][-1:] == "."] or [0]
            cuts = [starts[min(len(starts) - 1, int(d * len(starts)))] for d in depths]
            parts, prev = [], 0
            for cut, sentence in zip(cuts, sentences):
                parts += [" ".join(chunk[prev:cut]), sentence]
                prev = cut
            context = " ".join(p for p in [*parts, " ".join(chunk[prev:])] if p)
            ctx, q = build_prompt(tokenizer, context, question)
            total = len(ctx) + len(q) + ANSWER_TOKENS
            if total <= length or n_words <= 32:
                break
            n_words = int(n_words * length / total * 0.98)
        out.append(
            Sample(
                id=f"unseen-{kind}-L{length}-s{seed + i}",
                task=f"unseen/{kind}",
                context=context,
                question=question,
                references=[answer],
                metric=METRIC,
                max_new_tokens=ANSWER_TOKENS,
                metadata={
                    "length": length,
                    "prompt_tokens": len(ctx) + len(q),
                    "seed": seed + i,
                    "depths": [round(100 * d) for d in depths],
                    "haystack": "pydoc_data",
                },
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------- the family
DEFAULT_SAMPLES = 20


def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    n = args.n or DEFAULT_SAMPLES
    kind = task.subtask or ""
    return [s for length in lengths_of(task, args) for s in unseen_samples(tokenizer, kind, length, n, args.seed)]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", default="all", help="all (name, code, date, twofact) or comma-separated kinds")
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths: a list (2048,4096 or 2k,4k) or a range")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    names = select_tasks("unseen", args.kinds)
    return names, TaskArgs(lengths=parse_lengths(args.lengths), n=args.samples, seed=args.seed)


FAMILY = Family(
    "unseen",
    lambda: [Task(f"unseen/{k}", "unseen", METRIC, True, _generate) for k in UNSEEN_KINDS],
    help="the unseen-kinds set: names, codes, dates, two-sentence facts in Python's docs",
    add_options=_options,
    plan=_plan,
    word="unseen kind",
)
