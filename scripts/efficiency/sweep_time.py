"""Time the evaluation sweep per sample: RULER samples x the 29 configurations of docs/results/smollm2.md
(docs/results/efficiency.md, "Evaluation sweep time per sample").

    python scripts/efficiency/sweep_time.py --tasks niah_single_1,vt,niah_multivalue --length 4096 --threads 2 \
        --save after.json
    PYTHONPATH=/path/to/old/src python scripts/efficiency/sweep_time.py ... --save before.json   # another version
    python scripts/efficiency/sweep_time.py ... --decode-batch 16 --batch-lookahead 0 --compare after.json

Each sample runs `dapq.harness.runner.run` alone (one prefill, every method x budget selected from it, decoded in
batches) into a temporary folder; the script prints the wall and CPU seconds per sample and, with --save/--compare,
writes or compares every row's prediction and score. Works with dapq 0.1.0 and later (the runner's API).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch

METHODS = "full,snapkv,pyramidkv,h2o,streamingllm,lacache,laq,dapq"
BUDGETS = "64,128,256,512"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="niah_single_1,vt,niah_multivalue", help="RULER tasks, one sample each")
    ap.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-batch", type=int, default=None, help="RunConfig.decode_batch (default: its own)")
    ap.add_argument("--batch-lookahead", type=int, choices=(0, 1), default=None, help="RunConfig.batch_lookahead")
    ap.add_argument("--save", help="write the rows' predictions and scores here (JSON)")
    ap.add_argument("--compare", help="compare the rows' predictions and scores with this file (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console

    import dapq
    from dapq import load_model, runs
    from dapq.harness import runner
    from dapq.tasks.ruler import ruler_samples

    model, tok = load_model()
    samples = [s for t in args.tasks.split(",") for s in ruler_samples(tok, t.strip(), args.length, 1, seed=args.seed)]
    methods = [runner.MethodSpec(m.strip()) for m in args.methods.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    fields = {f.name for f in dataclasses.fields(runs.RunConfig)}
    kwargs = {}
    if args.decode_batch is not None:
        kwargs["decode_batch"] = args.decode_batch
    if args.batch_lookahead is not None and "batch_lookahead" in fields:
        kwargs["batch_lookahead"] = bool(args.batch_lookahead)
    config = runs.RunConfig(model="bundled", **kwargs)
    rows: dict[str, dict] = {}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for sample in samples:
            start, cpu = time.perf_counter(), time.process_time()
            out = os.path.join(tmp, sample.id.replace("/", "_"))
            path = runner.run(model, tok, [sample], methods, budgets, out, config=config, console=Console(quiet=True))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            times.append(wall)
            for r in runs.load_rows(path):
                rows[f"{r['sample_id']}|{r['method_key']}|{r['budget']}"] = {
                    "prediction": r["prediction"],
                    "score": r["score"],
                }
            print(
                f"{sample.id}: {wall:.1f} s wall, {cpu:.1f} s CPU ({sample.max_new_tokens} max new tokens)", flush=True
            )
    print(f"dapq {dapq.__version__}, {torch.get_num_threads()} threads, config {config}")
    print(f"mean {sum(times) / len(times):.1f} s per {args.length}-token sample ({len(rows)} rows)")
    if args.save:
        from dapq.safefile import write_text

        write_text(args.save, json.dumps(rows, indent=1), "json")
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            other = json.load(f)
        diff = [k for k in rows if k in other and rows[k] != other[k]]
        print(f"compared {len(set(rows) & set(other))} rows with {args.compare}: {len(diff)} differ")
        for k in diff[:10]:
            print(f"  {k}: {rows[k]} vs {other[k]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
