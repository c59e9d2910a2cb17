"""Profile the evaluation sweep: one or a few RULER samples through `dapq.bench.runner.run` with the 29
configurations of docs/results/smollm2.md (8 methods x budgets 64,128,256,512, FullKV once), phase by phase.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/profile_sweep.py --tasks niah_single_1,vt,niah_multivalue \
        --length 4096 --save /tmp/rows.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/profile_sweep.py ... --compare /tmp/rows.json

Phases per sample (wall clock, `time.perf_counter`): record (the one prefill), derive per method (selection, summed
over budgets), merge, decode per batch (rows, forward steps, row-steps), and the rest (scoring, row writing).
`--save` writes (sample, method, budget) -> prediction, score, new_tokens; `--compare` checks them against a saved
file (exit code 1 on any difference). `--cprofile N` prints the top N functions of a cProfile of the whole run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch

METHODS = "full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,dapq"
BUDGETS = "64,128,256,512"


class Timer:
    """Wraps runner-level functions to time each call; keeps a per-sample log of events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, float, float]] = []  # (kind, detail, wall seconds, CPU seconds)
        self.forward_rows: list[int] = []  # batch rows of every decode forward of the current decode call

    def wrap(self, module: Any, name: str, kind: str, detail: Any = None) -> None:
        fn = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.forward_rows.clear()  # forward steps inside this call only (LAQ's lookahead runs inside derive)
            start, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            d = detail(args, kwargs, out) if detail else None
            self.events.append((kind, d, time.perf_counter() - start, time.process_time() - cpu))
            return out

        setattr(module, name, wrapped)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="niah_single_1,vt,niah_multivalue")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=1, help="samples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-batch", type=int, default=16, help="RunConfig.decode_batch (rows per decode batch)")
    ap.add_argument("--save", help="write the rows' predictions and scores here (JSON)")
    ap.add_argument("--compare", help="compare the rows' predictions and scores with this file (JSON)")
    ap.add_argument("--cprofile", type=int, default=0, help="print the top N functions (cumulative) of a cProfile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console

    from dapq import generation, load_model
    from dapq.bench import runner
    from dapq.bench.ruler import ruler_samples

    model, tok = load_model()
    samples = [
        s
        for task in args.tasks.split(",")
        for s in ruler_samples(tok, task.strip(), args.length, args.samples, seed=args.seed)
    ]
    methods = [runner.MethodSpec(m.strip()) for m in args.methods.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]

    timer = Timer()
    timer.wrap(runner, "record", "record")
    timer.wrap(runner, "derive", "derive", lambda a, k, out: a[1].name)
    timer.wrap(runner, "merge", "merge", lambda a, k, out: len(a[0]))

    def decode_detail(a: Any, k: Any, out: Any) -> Any:
        rows = list(timer.forward_rows)
        timer.forward_rows.clear()
        cache = a[0].cache
        return {"rows": len(out), "steps": len(rows), "row_steps": sum(rows), "kv_len": cache.layers[0].keys.shape[2]}

    timer.wrap(runner, "greedy_decode", "decode", decode_detail)
    forward = generation._forward

    def counting_forward(cc: Any, ids: torch.Tensor, *a: Any) -> Any:
        timer.forward_rows.append(ids.shape[0])
        return forward(cc, ids, *a)

    generation._forward = counting_forward

    # runner.run writes every sample's rows before starting the next: split the event log at each record call
    per_sample: list[list[tuple[str, Any, float, float]]] = []
    sample_wall: list[tuple[float, float]] = []
    results: dict[str, Any] = {}
    prof = cProfile.Profile() if args.cprofile else None
    with tempfile.TemporaryDirectory() as tmp:
        for sample in samples:
            timer.events.clear()
            start, cpu = time.perf_counter(), time.process_time()
            if prof:
                prof.enable()
            path = runner.run(
                model,
                tok,
                [sample],
                methods,
                budgets,
                os.path.join(tmp, sample.id.replace("/", "_")),
                config=runner.RunConfig(model="bundled", decode_batch=args.decode_batch),
                console=Console(stderr=True, quiet=True),
            )
            if prof:
                prof.disable()
            sample_wall.append((time.perf_counter() - start, time.process_time() - cpu))
            per_sample.append(list(timer.events))
            for row in runner.load_rows(path):
                key = f"{row['sample_id']}|{row['method_key']}|{row['budget']}"
                results[key] = {"prediction": row["prediction"], "score": row["score"], "new_tokens": row["new_tokens"]}

    print(f"torch threads {torch.get_num_threads()}, {len(samples)} samples, {args.length} tokens")
    print("each figure: wall s / CPU s of this process (CPU time is the better measure on a shared machine)")
    for sample, events, (wall, cpu) in zip(samples, per_sample, sample_wall):

        def total(kind: str, events: list = events) -> tuple[float, float]:
            return sum(e[2] for e in events if e[0] == kind), sum(e[3] for e in events if e[0] == kind)

        rec, mer, dec = total("record"), total("merge"), total("decode")
        sel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for k, d, w, c in events:
            if k == "derive":
                sel[d][0] += w
                sel[d][1] += c
        sel_t = (sum(v[0] for v in sel.values()), sum(v[1] for v in sel.values()))
        rest = (wall - rec[0] - sel_t[0] - mer[0] - dec[0], cpu - rec[1] - sel_t[1] - mer[1] - dec[1])

        def f(x: tuple[float, float] | list[float]) -> str:
            return f"{x[0]:.2f}/{x[1]:.2f}"

        print(
            f"\n{sample.id} ({sample.task}, max_new_tokens {sample.max_new_tokens}): total {f((wall, cpu))} = "
            f"record {f(rec)} + select {f(sel_t)} + merge {f(mer)} + decode {f(dec)} + rest {f(rest)}"
        )
        print("  select: " + ", ".join(f"{m} {f(t)}" for m, t in sel.items()))
        for k, d, w, c in events:
            if k == "decode":
                print(
                    f"  decode batch: {d['rows']:2d} rows, kv {d['kv_len']:5d}, {d['steps']:3d} steps, "
                    f"{d['row_steps']:4d} row-steps: {w:.2f}/{c:.2f} s "
                    f"({1000 * c / max(1, d['steps']):.1f} CPU ms/step)"
                )
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.cprofile)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"saved {len(results)} rows to {args.save}")
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
        diff = [k for k in sorted(set(ref) | set(results)) if ref.get(k) != results.get(k)]
        for k in diff:
            print(f"DIFF {k}: before {ref.get(k)} after {results.get(k)}")
        print(f"compare: {len(results)} rows, {len(diff)} differences against {args.compare}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
