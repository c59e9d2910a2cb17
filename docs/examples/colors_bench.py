"""A benchmark family defined outside dapq: one object's colour hidden in filler text (docs/adding-a-benchmark.md).

Import this module (or install it with an entry point in the `dapq.tasks` group) and `dapq eval colors` runs it:
every method, budget, resume, report and Ray option of `dapq eval` works unchanged.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from dapq.tasks import Family, Sample, Task, TaskArgs, lengths_of, parse_lengths, register_family

OBJECTS = ("kite", "boat", "lamp", "door", "chair", "scarf", "bicycle", "teapot")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
FILLER = "The meeting ran long and nobody remembered what had been decided about the schedule. "


def colors_sample(length: int, seed: int) -> Sample:
    """One prompt of about `length` tokens (4 characters a token): the fact at a random depth of the filler."""
    rng = random.Random(seed)
    thing, color = rng.choice(OBJECTS), rng.choice(COLORS)
    n = max(1, (4 * length) // len(FILLER))
    parts = [FILLER] * n
    parts.insert(rng.randrange(n + 1), f"The color of the {thing} is {color}. ")
    return Sample(
        id=f"colors-L{length}-s{seed}",
        task="colors/fact",
        context="".join(parts),
        question=f"What color is the {thing}? Answer with one word.",
        references=[color],
        metric="string_match_all",  # a metric of dapq.tasks.metrics
        max_new_tokens=8,
        metadata={"length": length, "seed": seed},
    )


def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    n = args.n or 5
    return [colors_sample(length, args.seed + i) for length in lengths_of(task, args) for i in range(n)]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1000", help="prompt lengths (tokens), e.g. 1000,2000")


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    return ["colors/fact"], TaskArgs(lengths=parse_lengths(args.lengths), n=args.samples, seed=args.seed)


FAMILY = register_family(
    Family(
        "colors",
        lambda: [Task("colors/fact", "colors", "string_match_all", True, _generate)],
        help="one object's colour hidden in filler text (an example family)",
        add_options=_options,
        plan=_plan,
    )
)
