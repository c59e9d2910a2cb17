"""The README's demo: needle-in-a-haystack prompts on the bundled model, answered with FullKV, SnapKV and DapQ.

    dapq demo                      # 5 needles in ~1,500-token Paul Graham essay haystacks, budget 128
    dapq demo --budget 256 --context-tokens 2000
    dapq demo --methods full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,laq++,dapq,expected_attention --budget 512

It prints one table (depth x method: right or wrong, and the answer) and the KV memory each method kept. This is a
smoke demo on a 135M model, not a benchmark: the evaluation harness (`dapq eval`) is where numbers come from.
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
from .models import load_model


def run_demo(
    budget: int = 128,
    context_tokens: int = 1500,
    depths: tuple[float, ...] = (10, 30, 50, 70, 90),
    model_name: str | None = None,
    console: Console | None = None,
    methods: tuple[str, ...] = ("full", "snapkv", "dapq"),
) -> dict[str, Any]:
    """Run the demo and print its table (one row per method); returns the correct counts and the cells."""
    console = console or Console()
    start = time.perf_counter()
    built = [get_method(name, budget=budget) for name in methods]  # validated before the model load
    labels = [name if name == "full" else f"{name} B={budget}" for name in methods]
    console.print(f"Loading {model_name or 'the bundled SmolLM2-135M-Instruct'} ...")
    model, tok = load_model(model_name)
    rows: dict[str, list[str]] = {label: [] for label in labels}
    correct = dict.fromkeys(labels, 0)
    kv: dict[str, int] = {}
    peak: dict[str, int] = {}
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
                answer = out.text.strip().split()[0] if out.text.strip() else "-"
                rows[label].append("[green]yes[/]" if ok else f"[red]no[/] {answer[:9]}")
                progress.advance(task)
            prompt_len = out.stats["prompt_tokens"][0]
    table = Table(title=f"Needle in a haystack, ~{prompt_len} prompt tokens, greedy: needle found? (else the output)")
    for col in ["method", *[f"{s.depth:g}%" for s in samples], "correct", "KV MiB", "peak MiB"]:
        table.add_column(col)
    for label in labels:
        table.add_row(
            label,
            *rows[label],
            f"{correct[label]}/{len(samples)}",
            f"{kv[label] / 2**20:.1f}",
            f"{peak[label] / 2**20:.1f}",
        )
    console.print(table)
    console.print(
        f"Done in {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU threads. A 135M model with "
        "a small budget often loses the needle: the docs/results pages report measured sweeps."
    )
    return {"correct": correct, "rows": rows}
