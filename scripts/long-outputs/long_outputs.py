"""Long outputs with and without decode-time compression (docs/results/long-outputs.md).

For each of the first `--essays` evaluation essays: a document of `--words` words with one planted fact (a 7-digit
magic number for a word key, as in the demo) in its middle is compressed once (`dapq.Chat`, question-agnostic); the
model writes a long summary of `--new-tokens` tokens (stop tokens ignored, so every configuration writes the same
number of tokens), then is asked for the number; as a control, every configuration is also asked for it with no
long answer before it. Configurations: FullKV; SnapKV and the shipped learned queries at `--budget` compressing
the prompt only; SnapKV, DapQ and the learned queries at `--budget` also compressing during decoding (every
`--interval` tokens, window `--window`). Rows are appended to <out>/rows.jsonl as each run ends (a rerun skips
what is there); `--report` prints the table (ROUGE-L of each summary against FullKV's, the number found after the
long answer, KV bytes) and writes <out>/kv_over_time.png.

    OMP_NUM_THREADS=1 python scripts/long-outputs/long_outputs.py --out runs/long-outputs
    python scripts/long-outputs/long_outputs.py --out runs/long-outputs --report
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "full": ("full", False),
    "snapkv prefill only": ("snapkv", False),
    "snapkv + decode": ("snapkv", True),
    "dapq + decode": ("dapq", True),
    "learned prefill only": ("learned", False),
    "learned + decode": ("learned", True),
}
SUMMARY = "Write a long and detailed summary of the text above, paragraph by paragraph."
KEY = "quiet-lantern"
ASK = f"What is the special magic number for {KEY} mentioned in the provided text?"
PREFIX = f"The special magic number for {KEY} mentioned in the provided text is"


def document(path: Path, words: int, seed: int) -> tuple[str, str]:
    """The essay's first `words` words with a RULER-style needle (the demo's: a 7-digit number for a word key) in
    the middle; the number."""
    rng = random.Random(7_000_000 + seed)
    code = str(rng.randrange(1_000_000, 10_000_000))
    text = path.read_text(encoding="utf-8").split()[:words]
    fact = f"One of the special magic numbers for {KEY} is: {code}."
    half = len(text) // 2
    return " ".join(text[:half] + fact.split() + text[half:]), code


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of <out>/rows.jsonl (or the committed .jsonl.gz), through dapq's row reader: a torn last line is cut
    off, a foreign line is a one-line error."""
    from dapq.runs import check_fields, load_rows

    return load_rows(path, check=lambda row, where: check_fields(row, where, {"essay": str, "config": str}))


def run(args: argparse.Namespace) -> None:
    import torch

    from dapq import Chat, DecodeCompression, get_method, load_model
    from dapq.safefile import ensure_dir, open_append
    from dapq.train.corpus import evaluation_files

    torch.set_num_threads(1)
    out = ensure_dir(args.out)
    rows_path = out / "rows.jsonl"
    done = {(row["essay"], row["config"]) for row in read_rows(rows_path)}  # a torn last line is cut, not fatal
    model, tok = load_model()
    essays = evaluation_files()[: args.essays]
    dc = DecodeCompression(interval=args.interval, window=args.window)

    def method_of(name: str) -> Any:
        return get_method(name) if name == "full" else get_method(name, budget=args.budget)

    for e, path in enumerate(essays):
        doc, code = document(path, args.words, e)
        for name, (method_name, decode) in CONFIGS.items():
            first_key = f"{name} / asked first"
            if (path.name, first_key) not in done:  # the control: the code asked with no long answer before it
                chat = Chat(model, tok, doc, method_of(method_name))
                answer = chat.ask(ASK, max_new_tokens=16, answer_prefix=PREFIX).text
                with open_append(rows_path) as f:
                    f.write(json.dumps({"essay": path.name, "config": first_key, "code": code, "answer": answer,
                                        "code_found": code in answer}) + "\n")  # fmt: skip
            if (path.name, name) in done:
                continue
            method = method_of(method_name)
            start = time.perf_counter()
            chat = Chat(model, tok, doc, method)
            first = chat.ask(
                SUMMARY, max_new_tokens=args.new_tokens, decode_compression=dc if decode else None, ignore_stops=True
            )
            second = chat.ask(ASK, max_new_tokens=16, decode_compression=dc if decode else None, answer_prefix=PREFIX)
            steps = first.stats.get("kv_bytes_steps") or []
            row: dict[str, Any] = {
                "essay": path.name,
                "config": name,
                "method": method.describe(),
                "decode_compression": {"interval": dc.interval, "window": dc.window} if decode else None,
                "document_tokens": chat.stats()["document_tokens"],
                "summary_tokens": len(first.token_ids[0]),
                "summary": first.text,
                "code": code,
                "answer": second.text,
                "code_found": code in second.text,
                "kv_bytes_after_summary": first.stats["kv_bytes"],
                "kv_bytes_uncompressed_after_summary": first.stats["kv_bytes_uncompressed"],
                "kv_bytes_steps": steps[:: args.every],
                "max_entries_per_head": first.stats.get("max_entries_per_head"),
                "evictions": first.stats.get("evictions", 0),
                "summary_decode_s": first.stats["decode_s"],
                "total_s": time.perf_counter() - start,
            }
            with open_append(rows_path) as f:
                f.write(json.dumps(row) + "\n")
            print(f"{path.name} {name}: {row['summary_tokens']} tokens, code found {row['code_found']}, "
                  f"{row['total_s']:.0f} s", flush=True)  # fmt: skip


def report(args: argparse.Namespace) -> None:
    from rouge_score import rouge_scorer

    from dapq.safefile import save_figure

    path = Path(args.out) / "rows.jsonl"
    if not path.is_file():
        path = path.with_suffix(".jsonl.gz")
    rows = read_rows(path)
    if not rows:
        raise SystemExit(f"No rows in {path}: run the measurement first (without --report).")
    found_first = {
        name: sum(r["code_found"] for r in rows if r["config"] == f"{name} / asked first") for name in CONFIGS
    }
    asked_first = {name: sum(r["config"] == f"{name} / asked first" for r in rows) for name in CONFIGS}
    rows = [r for r in rows if not r["config"].endswith(" / asked first")]
    full = {r["essay"]: r["summary"] for r in rows if r["config"] == "full"}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    mib = 2**20
    print("| configuration | essays | summary tokens | ROUGE-L F vs FullKV | code found after the summary | "
          "code found, asked first | most entries per head | KV after the summary (MiB) | uncompressed (MiB) | "
          "summary decode s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        rouge = [scorer.score(full[r["essay"]], r["summary"])["rougeL"].fmeasure for r in mine if r["essay"] in full]
        n = len(mine)
        entries = [r["max_entries_per_head"] for r in mine if r["max_entries_per_head"]]
        print(
            f"| {name} | {n} | {sum(r['summary_tokens'] for r in mine) / n:.0f} | "
            f"{sum(rouge) / len(rouge):.3f} | {sum(r['code_found'] for r in mine)}/{n} | "
            f"{found_first[name]}/{asked_first[name]} | "
            f"{max(entries) if entries else '-'} | "
            f"{sum(r['kv_bytes_after_summary'] for r in mine) / n / mib:.2f} | "
            f"{sum(r['kv_bytes_uncompressed_after_summary'] for r in mine) / n / mib:.2f} | "
            f"{sum(r['summary_decode_s'] for r in mine) / n:.0f} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    essay = rows[0]["essay"]
    for r in rows:
        if r["essay"] == essay and r["kv_bytes_steps"]:
            xs = [i * args.every for i in range(len(r["kv_bytes_steps"]))]
            ax.plot(xs, [b / mib for b in r["kv_bytes_steps"]], label=r["config"])
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(f"KV bytes while writing a long summary ({essay})")
    ax.legend()
    save_figure(fig, Path(args.out) / "kv_over_time.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--essays", type=int, default=4)
    parser.add_argument("--words", type=int, default=900)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--every", type=int, default=8, help="keep the KV bytes of every N-th step in the rows")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
