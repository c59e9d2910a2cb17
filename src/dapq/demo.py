"""The README's demo: needle-in-a-haystack prompts on the bundled model, answered with FullKV, SnapKV, DapQ, LAQ
and the learned pseudo queries (the best one-prefill method we measured, docs/results/front.md).

    dapq demo                      # 5 needles in ~1,000-token Paul Graham essay haystacks, budget 128
    dapq demo --budget 256 --context-tokens 2000
    dapq demo --methods full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,laq++,dapq,expected_attention --budget 512

It prints one table (depth x method: right or wrong, and the answer), the KV memory each method kept, its accounted
peak during compression and its time to first token, then one line saying what the table shows (computed from it).
This is a demo on a 135M model, not a benchmark: the evaluation harness (`dapq eval`) is where numbers come from.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .data import needle_sample
from .engine import generate
from .methods import get_method
from .methods.protocols import ContextPass, Staged
from .models import load_model

DEMO_METHODS = ("full", "snapkv", "dapq", "laq", "learned")


def kind_of(method: Any) -> str:
    """full, lookahead (decodes on a temporary cache before selecting: FullKV's peak) or one prefill."""
    if not method.compresses:
        return "full"
    if isinstance(method, Staged):
        return "lookahead"
    if isinstance(method, ContextPass):
        return "second pass"
    return "one prefill"


def run_demo(
    budget: int = 128,
    context_tokens: int = 1000,
    depths: tuple[float, ...] = (10, 30, 50, 70, 90),
    model_name: str | None = None,
    console: Console | None = None,
    methods: tuple[str, ...] = DEMO_METHODS,
) -> dict[str, Any]:
    """Run the demo and print its table (one row per method); returns the correct counts and the cells."""
    console = console or Console()
    start = time.perf_counter()
    built = [get_method(name, budget=budget) for name in methods]  # validated before the model load
    labels = [f"{m.name} B={budget}" if m.evicts else m.name for m in built]
    console.print(f"Loading {model_name or 'the bundled SmolLM2-135M-Instruct'} ...")
    model, tok = load_model(model_name)
    rows: dict[str, list[str]] = {label: [] for label in labels}
    correct = dict.fromkeys(labels, 0)
    kv: dict[str, int] = {}
    peak: dict[str, int] = {}
    ttft: dict[str, list[float]] = {label: [] for label in labels}
    samples = [needle_sample(tok, context_tokens, d, seed=0) for d in depths]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("needles x methods", total=len(samples) * len(built))
        for sample in samples:
            for label, method in zip(labels, built):
                out = generate(
                    model,
                    tok,
                    sample.context,
                    sample.question,
                    method,
                    answer_prefix=sample.answer_prefix,
                    max_new_tokens=12,
                )
                ok = sample.answer in out.text
                correct[label] += ok
                kv[label] = out.stats["kv_bytes_compressed"]
                peak[label] = out.stats["kv_bytes_peak"]
                ttft[label].append(out.stats["prefill_s"])
                answer = out.text.strip().split()[0] if out.text.strip() else "-"
                rows[label].append("[green]yes[/]" if ok else f"[red]no[/] {answer[:9]}")
                progress.advance(task)
            prompt_len = out.stats["prompt_tokens"][0]
    table = Table(title=f"Needle in a haystack, ~{prompt_len} prompt tokens, greedy: needle found? (else the output)")
    for col in ["method", "kind", *[f"{s.depth:g}%" for s in samples], "found", "KV MiB", "peak MiB", "TTFT s"]:
        table.add_column(col)
    kinds = {label: kind_of(m) for label, m in zip(labels, built)}
    mean_ttft = {label: sum(v) / len(v) for label, v in ttft.items()}
    for label in labels:
        table.add_row(
            label,
            kinds[label],
            *rows[label],
            f"{correct[label]}/{len(samples)}",
            f"{kv[label] / 2**20:.1f}",
            f"{peak[label] / 2**20:.1f}",
            f"{mean_ttft[label]:.2f}",
        )
    console.print(table)
    console.print(story(labels, kinds, correct, peak, mean_ttft, len(samples)))
    console.print(
        f"Done in {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU threads. n = {len(samples)} "
        "needles: a demo, not a benchmark; docs/results/front.md reports the measured sweeps."
    )
    return {"correct": correct, "rows": rows, "peak": peak, "ttft": mean_ttft, "kinds": kinds}


def story(
    labels: list[str],
    kinds: dict[str, str],
    correct: dict[str, int],
    peak: dict[str, int],
    ttft: dict[str, float],
    n: int,
) -> str:
    """One sentence from the table: the best one-prefill method (most needles, then the lowest peak) against the
    best method overall and FullKV's peak."""
    one = [lb for lb in labels if kinds[lb] == "one prefill"]
    best_all = max(labels, key=lambda lb: (correct[lb], -peak[lb]))
    parts = [f"Most needles: {best_all} ({correct[best_all]}/{n}, peak {peak[best_all] / 2**20:.1f} MiB)."]
    if one:
        best = max(one, key=lambda lb: (correct[lb], -peak[lb]))
        parts.append(
            f"Best one-prefill method: {best} ({correct[best]}/{n}, peak {peak[best] / 2**20:.1f} MiB, "
            f"TTFT {ttft[best]:.2f} s)."
        )
    others = [lb for lb in labels if kinds[lb] == "lookahead"]
    for lb in others:
        parts.append(
            f"{lb} decodes on a temporary cache first: {correct[lb]}/{n} at a peak of {peak[lb] / 2**20:.1f} MiB."
        )
    return " ".join(parts)
