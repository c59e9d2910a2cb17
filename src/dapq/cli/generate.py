"""`dapq generate`: answer a question about a context with a compressed KV cache.

dapq generate --method dapq --budget 128 --context-file report.txt --question "Who signed it?"
dapq generate --method snapkv --budget 0.1 --param window=16 --context-file report.txt -q "..." --json
dapq generate --method dapq --budget 128 --context-file report.txt -q "..." --sample --temperature 0.7 --seed 1 --stream
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DapqError
from .args import (
    MODES,
    add_model_options,
    check_model_options,
    check_positive,
    load_model_from_args,
    method_from_args,
)


def add_parser(sub: Any) -> None:
    gen = sub.add_parser(
        "generate",
        help="answer a question about a context with a compressed KV cache",
        description="Compress the prompt's KV cache with one method, then answer (greedy, or sampled with --sample).",
    )
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--context-file", help="text file with the context")
    src.add_argument("--context", help="the context as a string")
    gen.add_argument("--question", "-q", required=True, help="the question asked about the context")
    gen.add_argument("--method", default="dapq", help="method name (see `dapq list`); default dapq")
    gen.add_argument(
        "--budget",
        default=None,
        help="tokens kept per head (int) or ratio of the prompt (0 < x < 1); default: the method's own",
    )
    gen.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, e.g. n_pseudo_tokens=16 (repeatable; see `dapq list`)",
    )
    gen.add_argument(
        "--mode",
        choices=MODES,
        default="query_aware",
        help="query_aware (default): compress context and question; question_agnostic: compress the context only",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--answer-prefix", default="", help="text the answer starts with (appended to the prompt)")
    gen.add_argument(
        "--no-chat-template", action="store_true", help="plain prompt even if the tokenizer has a template"
    )
    add_sampling_options(gen)
    add_decode_options(gen)
    add_model_options(gen)
    gen.add_argument("--json", action="store_true", help="print text and stats as JSON")
    gen.set_defaults(func=cmd_generate)


def add_sampling_options(parser: Any, stream: bool = True) -> None:
    """--sample, --temperature, --top-k, --top-p, --seed and (`stream`) --stream; shared with `dapq chat`, which
    always streams."""
    grp = parser.add_argument_group("sampling and streaming (default: greedy, printed at the end)")
    grp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    grp.add_argument("--temperature", type=float, default=None, help="with --sample: logits divided by T (1.0)")
    grp.add_argument("--top-k", type=int, default=None, help="with --sample: keep the K most likely tokens (0: all)")
    grp.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus mass (1.0: all)")
    grp.add_argument("--seed", type=int, default=None, help="with --sample: seed of the draws (reproducible output)")
    if stream:
        grp.add_argument("--stream", action="store_true", help="print the answer's tokens as they come")


def sampling_of(args: argparse.Namespace) -> Any:
    """The `Sampling` of --sample and its options (None: greedy); its options without --sample are an error."""
    names = ("temperature", "top_k", "top_p", "seed")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if not args.sample:
        if given:
            raise DapqError(f"{', '.join(given)} only apply when sampling: add --sample.")
        return None
    from ..engine.decode import Sampling

    return Sampling(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
    )


def add_decode_options(parser: Any) -> None:
    """--decode-interval and --decode-window (shared with `dapq chat`)."""
    dt = parser.add_argument_group("compression during decoding (default: only the prompt is compressed)")
    dt.add_argument(
        "--decode-interval",
        type=int,
        default=None,
        help="evict back to the budget every N generated tokens (scoring methods: snapkv, dapq, learned, ...)",
    )
    dt.add_argument(
        "--decode-window", type=int, default=None, help="recent tokens whose queries score the cache (default 16)"
    )


def decode_compression_of(args: argparse.Namespace) -> Any:
    """The `DecodeCompression` of --decode-interval / --decode-window (None: the prompt only)."""
    if args.decode_interval is None:
        if args.decode_window is not None:
            raise DapqError("--decode-window applies with --decode-interval: pass both.")
        return None
    from ..engine.decode_time import DecodeCompression

    window = 16 if args.decode_window is None else args.decode_window
    return DecodeCompression(interval=args.decode_interval, window=min(window, args.decode_interval))


class PrintStreamer:
    """Prints the new tokens of one row as they come, decoding the whole answer so far each time (so multi-token
    characters and word-initial spaces come out right) and printing only what was not printed yet."""

    def __init__(self, tokenizer: Any, write: Any):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def put(self, value: Any) -> None:
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            return
        self.write(text[len(self.shown) :])
        self.shown = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.write(text[len(self.shown) :] + "\n")
        self.shown = text


def read_context(args: argparse.Namespace) -> str:
    """The context of --context-file (UTF-8 text, not empty) or --context."""
    if args.context_file is None:
        context = args.context or ""
        if args.mode == "question_agnostic" and not context.strip():
            raise DapqError("question_agnostic mode compresses the context: pass --context or --context-file.")
        return context
    return read_context_file(args.context_file)


def read_context_file(name: str) -> str:
    """The text of --context-file: an existing, UTF-8, non-empty text file (`dapq generate`, `dapq chat`)."""
    path = Path(name)
    if not path.is_file():
        raise DapqError(f"--context-file {path} does not exist.")
    data = path.read_bytes()
    try:
        context = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DapqError(f"--context-file {path} is not UTF-8 text (a binary file?): pass a text file.") from None
    if "\x00" in context:
        raise DapqError(f"--context-file {path} contains NUL bytes (a binary file?): pass a text file.")
    if not context.strip():
        raise DapqError(f"--context-file {path} is empty: pass a file with the context.")
    return context


def cmd_generate(args: argparse.Namespace, console: Any) -> int:
    import json

    from ..engine import generate

    # everything that can be checked is checked before the (slow) model load
    context = read_context(args)
    if not args.question.strip():
        raise DapqError("--question is empty: pass the question to answer about the context.")
    check_positive(args.max_new_tokens, "--max-new-tokens")
    sampling = sampling_of(args)
    decode_compression = decode_compression_of(args)
    if args.stream and args.json:
        raise DapqError("--stream prints text as it comes and --json prints one JSON object: pass only one.")
    method = method_from_args(args)
    check_model_options(args)
    model, tok = load_model_from_args(args)
    out = generate(
        model,
        tok,
        context,
        args.question,
        method,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        chat_template=False if args.no_chat_template else None,
        answer_prefix=args.answer_prefix,
        sampling=sampling,
        streamer=PrintStreamer(tok, stream_writer()) if args.stream else None,
        decode_compression=decode_compression,
    )
    if args.json:
        print(json.dumps({"text": out.text, "stats": out.stats}, indent=2))
    else:
        if not args.stream:
            console.print(out.text, markup=False, highlight=False)
        s = out.stats
        console.print(
            f"[dim]{method.describe()} | prompt {s['prompt_tokens'][0]} tokens | kept per layer (mean) "
            f"{sum(s['kept_per_layer']) / len(s['kept_per_layer']):.1f} | KV {s['kv_bytes_full'] / 2**20:.2f} -> "
            f"{s['kv_bytes_compressed'] / 2**20:.2f} MiB (peak {s['kv_bytes_peak'] / 2**20:.2f}) | "
            f"prefill {s['prefill_s']:.2f} s, "
            f"decode {s['decode_s']:.2f} s[/]"
        )
        if decode_compression is not None:
            console.print(
                f"[dim]during decoding: {s['evictions']} evictions, at most {s['max_entries_per_head']} entries per "
                f"head, KV {s['kv_bytes_steps'][-1] / 2**20:.2f} MiB at the end[/]"
                if s.get("kv_bytes_steps")
                else "[dim]during decoding: no token was fed after the first[/]"
            )
    return 0


def stream_writer() -> Any:
    import sys

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return write
