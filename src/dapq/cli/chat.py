"""`dapq chat`: compress a document once, then answer questions typed at a prompt, turn after turn.

dapq chat --context-file report.txt --method snapkv --budget 128
dapq chat --context-file report.txt --method dapq --budget 64 --sample --temperature 0.7 --seed 1
dapq chat --context-file report.txt --method snapkv --budget 256 --decode-interval 64   # holds while answering

The conversation so far stays in the cache (only the document is compressed); after each answer one line shows the
KV kept and the memory saved against an uncompressed cache. Type /quit (or Ctrl-D) to leave, /stats for the cache.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import DapqError
from .args import (
    add_model_options,
    check_model_options,
    check_positive,
    load_model_from_args,
    method_from_args,
)
from .generate import (
    PrintStreamer,
    add_decode_options,
    add_sampling_options,
    decode_compression_of,
    sampling_of,
    stream_writer,
)

PROMPT = "you> "
QUIT = ("/quit", "/exit", "/q")


def add_parser(sub: Any) -> None:
    chat = sub.add_parser(
        "chat",
        help="compress a document once, then answer questions turn after turn",
        description="Compress the document's KV cache once with one method, then answer the questions you type; "
        "the conversation stays in the cache. /quit or Ctrl-D leaves, /stats shows the cache.",
    )
    chat.add_argument("--context-file", required=True, help="text file with the document")
    chat.add_argument("--method", default="dapq", help="method name (see `dapq list`); default dapq")
    chat.add_argument("--budget", default=None, help="tokens kept per head (int) or ratio of the document (0 < x < 1)")
    chat.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    chat.add_argument(
        "--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a template"
    )
    add_sampling_options(chat, stream=False)
    add_decode_options(chat)
    add_model_options(chat)
    chat.set_defaults(func=cmd_chat)


def describe(stats: dict[str, Any]) -> str:
    mib = 2**20
    return (
        f"KV {stats['kv_bytes'] / mib:.2f} MiB (document: {stats['document_kept_mean']:.0f} of "
        f"{stats['document_tokens']} tokens kept per head; conversation: {stats['conversation_tokens']} tokens) vs "
        f"{stats['kv_bytes_uncompressed'] / mib:.2f} MiB uncompressed: {100 * stats['saved']:.0f}% saved"
    )


def cmd_chat(args: argparse.Namespace, console: Any) -> int:
    from .generate import read_context_file

    document = read_context_file(args.context_file)
    check_positive(args.max_new_tokens, "--max-new-tokens")
    sampling = sampling_of(args)
    decode_compression = decode_compression_of(args)
    method = method_from_args(args)
    check_model_options(args)
    model, tok = load_model_from_args(args)
    from ..engine.chat import Chat

    with console.status("compressing the document ..."):
        chat = Chat(model, tok, document, method, chat_template=False if args.no_chat_template else None)
    console.print(f"[dim]{method.describe()} | compressed in {chat.stats()['prefill_s']:.1f} s[/]")
    console.print(f"[dim]{describe(chat.stats())}[/]")
    console.print("[dim]Ask about the document; /quit or Ctrl-D to leave.[/]")
    while True:
        try:
            question = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            break
        question = question.strip()
        if not question:
            continue
        if question in QUIT:
            break
        if question == "/stats":
            console.print(f"[dim]{describe(chat.stats())}[/]")
            continue
        try:
            out = chat.ask(
                question,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                streamer=PrintStreamer(tok, stream_writer()),
                decode_compression=decode_compression,
            )
        except DapqError as exc:  # a full context: say so and stay in the chat
            console.print(f"error: {exc}", markup=False, highlight=False)
            continue
        console.print(f"[dim]{describe(out.stats)} | {out.stats['decode_s']:.1f} s[/]")
    return 0
