"""Efficiency benchmarks: time to first token, decode throughput, peak memory (the paper's Tables 3, 4 and 7).

    dapq bench ttft       --lengths 1k,2k,4k --methods full,snapkv,dapq,laq --budget 256
    dapq bench throughput --context 4k --new-tokens 150 --batch-sizes 1,4,8,16 --budget 256 --memory-cap 4GiB
    dapq bench memory     --lengths 1k,2k,4k --methods full,snapkv,dapq,laq --budget 256

Rules: the device is synchronised before every clock read; warm-up runs are excluded; every number is the median
of `repeats` runs (TTFT: interleaved across methods, the minimum recorded too); the machine, thread count and
versions go into the JSON next to the numbers, and so does every method's configuration as it ran (`learned`
without `queries` resolved to the model's shipped file) with the sha256 of each file it read.

- TTFT: prompt ids -> first token, i.e. `compress` (prefill through the hook, selection, LAQ's lookahead stage) and
  the argmax. The row `transformers` is the plain model forward (no hook, DynamicCache) for the hook's overhead.
- Memory: peak bytes allocated during `compress` above what was allocated before (CUDA: the allocator's peak; CPU:
  the profiler's allocation trace), next to the same for a plain forward without cache (activations only); their
  difference is what the cache costs at its worst moment. `kv_accounted_peak` is the layer-by-layer bound (one
  full layer + the layers already compressed; LAQ: full + stage-1 + lookahead).
- Throughput: one compressed prompt replicated into a batch, then exactly `new_tokens` greedy tokens per row;
  tokens/s = batch x new_tokens / decode time. The memory needed per batch is weights + the measured peak of
  building the batch's cache, reserving room for every new token and decoding two steps; a batch "fits" when that is
  within `--memory-cap` (on CUDA a batch that runs out of memory is reported as OOM instead); beyond the tested
  sizes, a straight line through the two largest measured points estimates the largest batch that fits.

The command line is `dapq.cli.bench`. The kvpress side-by-side is the reproduction script
scripts/kvpress/vs_kvpress.py (docs/results/kvpress.md).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..engine import compress, greedy_decode, merge, sync_device
from ..errors import DapqError
from ..hf.cache import kv_bytes, reserve
from ..methods.base import Method, get_method, method_class
from ..methods.protocols import extra_positions

GiB = 2**30
MiB = 2**20


# ---------------------------------------------------------------------------------------------------- measuring
def machine_info(model: Any) -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import transformers

    from .. import __version__

    device = model.get_input_embeddings().weight.device
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(model.get_input_embeddings().weight.dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "versions": {
            "dapq": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    return info


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run fn with the device synchronised before and after; (seconds, result)."""
    sync_device(device)
    start = time.perf_counter()
    result = fn()
    sync_device(device)
    return time.perf_counter() - start, result


def peak_allocated(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Peak bytes allocated while fn runs, above what was allocated when it started; (bytes, fn's result).

    CUDA: torch.cuda.max_memory_allocated. CPU: the running 'Total Allocated' of the profiler's memory events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and "args" in e), key=lambda e: e["ts"])
    if not mem:
        return 0, result
    # 'Total Allocated' is a running total that also carries tensors of earlier profiled calls freed since (their
    # frees happen outside a session and are not seen): measure from this session's own starting level.
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in mem) - base), result


# ---------------------------------------------------------------------------------------------------- inputs
def bench_prompt(tokenizer: Any, length: int, seed: int = 0) -> list[int]:
    """A prompt of about `length` tokens: the bundled essays with a summarisation request."""
    from ..tasks.summary import summary_prompt

    return summary_prompt(tokenizer, length, seed)


def build_method(
    name: str, budget: int | float, params: dict[str, dict[str, Any]] | None = None, model_config: Any = None
) -> Method:
    """The method `name` (or a variant `name@label`) at `budget` (FullKV takes none), with `params[name]`; with
    `model_config`, its defaults for that model filled in (`learned` without `queries`: the model's shipped file)."""
    base = name.partition("@")[0]
    extra = (params or {}).get(name, {})
    method = get_method(base, budget=budget, **extra) if method_class(base).evicts else get_method(base, **extra)
    return method if model_config is None else method.for_model(model_config)


def method_records(methods: dict[str, Method]) -> dict[str, dict[str, Any]]:
    """What each benchmarked method was: its class name, every field (as a row's `method_config`) and the sha256 of
    every file it read, so a result names the queries file it measured, not only `learned`."""
    return {
        name: {"method": m.name, "config": dataclasses.asdict(m), "files": m.file_hashes()}
        for name, m in methods.items()
    }


def _check_fits(model: Any, length: int, extra: int) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and length + extra > max_pos:
        raise DapqError(
            f"A {length}-token prompt plus {extra} more positions exceeds the model's {max_pos} positions: "
            f"use lengths up to {max_pos - extra}."
        )


def _plain_prefill(model: Any, ids: list[int], use_cache: bool = True) -> Any:
    from transformers.cache_utils import DynamicCache

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        return (
            model(
                input_ids=torch.tensor([ids], device=device),
                past_key_values=DynamicCache() if use_cache else None,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .argmax(-1)
        )


# ---------------------------------------------------------------------------------------------------- benches
def bench_ttft(
    model: Any,
    tokenizer: Any,
    lengths: list[int],
    methods: list[str],
    budget: int | float,
    *,
    repeats: int = 5,
    warmup: int = 1,
    params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median TTFT (s) per method and prompt length; row "transformers" is the plain model without the hook.

    Runs are interleaved: each repeat times every method once, in the same order, so a slow phase of a shared
    machine (another process, frequency changes) hits all methods alike instead of whichever method ran during it.
    Each cell also records the fastest run (`min_s`), the usual least-noise estimate of a deterministic cost."""
    device = model.get_input_embeddings().weight.device
    rows: dict[str, dict[int, Any]] = {"transformers": {}}
    rows.update({m: {} for m in methods})
    built = {name: build_method(name, budget, params, model.config) for name in methods}
    for length in lengths:
        ids = bench_prompt(tokenizer, length)
        n = len(ids)
        fns: dict[str, Callable[[], Any]] = {"transformers": lambda ids=ids: _plain_prefill(model, ids)}
        for name in methods:
            method = built[name]
            _check_fits(model, n, extra_positions(method) + 1)

            def first_token(method: Method = method, ids: list[int] = ids) -> int:
                cc = compress(model, tokenizer, [ids], method)
                return int(cc.first_logits.argmax(-1)[0])

            fns[name] = first_token
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(timed(fn, device)[0])
        for name, runs in times.items():
            med = statistics.median(runs)
            rows[name][length] = {"prompt_tokens": n, "ttft_s": med, "min_s": min(runs), "runs_s": runs}
            if progress and name != "transformers":
                progress(f"ttft {name} {n} tokens: {med:.3f} s (min {min(runs):.3f})")
    for name in methods:
        for length, cell in rows[name].items():
            full = rows.get("full", {}).get(length) or rows["transformers"][length]
            cell["vs_full_pct"] = 100.0 * (cell["ttft_s"] / full["ttft_s"] - 1.0)
            cell["vs_full_min_pct"] = 100.0 * (cell["min_s"] / full["min_s"] - 1.0)
    return {
        "kind": "ttft",
        "budget": budget,
        "lengths": lengths,
        "repeats": repeats,
        "warmup": warmup,
        "methods": method_records(built),
        "rows": rows,
    }


def bench_memory(
    model: Any,
    tokenizer: Any,
    lengths: list[int],
    methods: list[str],
    budget: int | float,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Peak allocated bytes during the compressing prefill, per method and length (see the module docstring)."""
    device = model.get_input_embeddings().weight.device
    rows: dict[str, dict[int, Any]] = {"activations only": {}}
    rows.update({m: {} for m in methods})
    built = {name: build_method(name, budget, params, model.config) for name in methods}
    for length in lengths:
        ids = bench_prompt(tokenizer, length)
        _plain_prefill(model, ids, use_cache=False)  # warm-up
        act, _ = peak_allocated(lambda ids=ids: _plain_prefill(model, ids, use_cache=False), device)
        rows["activations only"][length] = {"prompt_tokens": len(ids), "peak_bytes": act}
        for name in methods:
            method = built[name]
            _check_fits(model, len(ids), extra_positions(method) + 1)
            compress(model, tokenizer, [ids], method)  # warm-up (first-call allocations are not the method's)
            peak, cc = peak_allocated(lambda m=method, ids=ids: compress(model, tokenizer, [ids], m), device)
            stats = cc.stats
            rows[name][length] = {
                "prompt_tokens": len(ids),
                "peak_bytes": peak,
                "peak_over_activations": peak - act,
                "kv_accounted_peak": stats["kv_bytes_peak"],
                "kv_full": stats["kv_bytes_full"],
                "kv_final": stats["kv_bytes_compressed"],
                "one_layer_full": stats["kv_bytes_full"] // len(cc.cache.layers),
            }
            del cc
            if progress:
                progress(f"memory {name} {len(ids)} tokens: peak {peak / MiB:.1f} MiB (activations {act / MiB:.1f})")
    return {"kind": "memory", "budget": budget, "lengths": lengths, "methods": method_records(built), "rows": rows}


def _replicate(cc: Any, batch: int) -> Any:
    """`batch` copies of a one-row compressed cache, as one batch (fresh tensors: decoding appends to them)."""
    return merge([cc] * batch)


def _decode_start(cc: Any, batch: int, new_tokens: int) -> None:
    """What decoding `new_tokens` tokens for `batch` rows holds at its worst: the batch's cache with room for every
    new token (greedy_decode reserves it up front, one layer copied at a time) plus two decode steps' activations."""
    rows = _replicate(cc, batch)
    reserve(rows.cache, new_tokens)
    greedy_decode(rows, rows.first_logits, 2, set())


def estimate_max_batch(measured: list[tuple[int, int]], cap: int) -> int | None:
    """Largest batch whose memory fits `cap`, by a straight line through the two largest measured (batch, bytes)
    points (memory is weights + batch x per-row cost); None with fewer than two points."""
    if len(measured) < 2:
        return None
    (b0, m0), (b1, m1) = measured[-2], measured[-1]
    per_row = (m1 - m0) / (b1 - b0)
    if per_row <= 0:
        return None
    fixed = m1 - per_row * b1
    return max(0, int((cap - fixed) // per_row))


def bench_throughput(
    model: Any,
    tokenizer: Any,
    context: int,
    new_tokens: int,
    batch_sizes: list[int],
    methods: list[str],
    budget: int | float,
    *,
    repeats: int = 3,
    memory_cap: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode tokens/s per method and batch size, and the memory each batch needs (see the module docstring)."""
    device = model.get_input_embeddings().weight.device
    ids = bench_prompt(tokenizer, context)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: dict[str, dict[int, Any]] = {m: {} for m in methods}
    built = {name: build_method(name, budget, params, model.config) for name in methods}
    for name in methods:
        method = built[name]
        _check_fits(model, len(ids), extra_positions(method) + new_tokens)
        cc = compress(model, tokenizer, [ids], method)
        for b in batch_sizes:
            try:
                warm = _replicate(cc, b)
                greedy_decode(warm, warm.first_logits, 3, set())  # warm-up (excluded)
                del warm
                # The whole batch is built inside the measured call: the CPU profiler does not see frees of tensors
                # allocated before it started, so a cache made outside would count twice once reserve() copies it.
                need_peak, _ = peak_allocated(lambda cc=cc, b=b: _decode_start(cc, b, new_tokens), device)
                times = []
                kv_end = 0
                for _ in range(repeats):
                    batch = _replicate(cc, b)
                    t, _ = timed(
                        lambda batch=batch: greedy_decode(batch, batch.first_logits, new_tokens, set()), device
                    )
                    times.append(t)
                    kv_end = kv_bytes(batch.cache)
                    del batch
            except torch.OutOfMemoryError:
                rows[name][b] = {"oom": True}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if progress:
                    progress(f"throughput {name} batch {b}: OOM")
                continue
            t = statistics.median(times)
            need = weights + need_peak
            rows[name][b] = {
                "tokens_per_s": b * new_tokens / t,
                "decode_s": t,
                "runs_s": times,
                "kv_bytes_end": kv_end,
                "decode_peak_bytes": need_peak,
                "memory_bytes": need,
                "fits_cap": None if memory_cap is None else need <= memory_cap,
            }
            if progress:
                progress(f"throughput {name} batch {b}: {b * new_tokens / t:.1f} tokens/s, needs {need / GiB:.2f} GiB")
        del cc
    max_batch = {}
    if memory_cap is not None:
        for name, cells in rows.items():
            ok = [b for b, c in cells.items() if not c.get("oom") and c.get("fits_cap")]
            measured = sorted((b, c["memory_bytes"]) for b, c in cells.items() if not c.get("oom"))
            max_batch[name] = {
                "largest_tested_that_fits": max(ok) if ok else None,
                "estimated_max_batch": estimate_max_batch(measured, memory_cap),
            }
    return {
        "kind": "throughput",
        "budget": budget,
        "context": len(ids),
        "new_tokens": new_tokens,
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "weights_bytes": weights,
        "memory_cap": memory_cap,
        "max_batch": max_batch,
        "methods": method_records(built),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------- tables
def markdown(result: dict[str, Any]) -> str:
    """The paper's layout: method rows; columns are lengths (TTFT, memory) or batch sizes (throughput)."""
    kind, rows = result["kind"], result["rows"]
    cols = result["batch_sizes"] if kind == "throughput" else result["lengths"]
    if kind == "ttft":
        head = "TTFT (s, median of interleaved runs), columns: prompt length; in brackets: vs FullKV (median, min)"
    elif kind == "memory":
        head = "Peak allocated memory during the compressing prefill (MiB), columns: prompt length"
    else:
        head = f"Decode throughput (tokens/s), {result['context']}-token context, {result['new_tokens']} new tokens"
    lines = [f"{head}; budget {result['budget']}.", "", "| method | " + " | ".join(str(c) for c in cols) + " |"]
    lines.append("|---|" + "---|" * len(cols))
    for name, cells in rows.items():
        out = []
        for c in cols:
            cell = cells.get(c)
            if cell is None:
                out.append("-")
            elif kind == "ttft":
                pct = ""
                if "vs_full_pct" in cell and name != "full":
                    pct = f" ({cell['vs_full_pct']:+.1f}%, {cell['vs_full_min_pct']:+.1f}%)"
                out.append(f"{cell['ttft_s']:.3f}{pct}")
            elif kind == "memory":
                extra = ""
                if "kv_accounted_peak" in cell:
                    extra = f" (KV bound {cell['kv_accounted_peak'] / MiB:.1f})"
                out.append(f"{cell['peak_bytes'] / MiB:.1f}{extra}")
            else:
                if cell.get("oom"):
                    out.append("OOM")
                else:
                    fits = "" if cell["fits_cap"] is None else ("" if cell["fits_cap"] else " (over cap)")
                    out.append(f"{cell['tokens_per_s']:.1f}{fits}")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    if kind == "throughput":
        lines += [
            "",
            "Memory needed (GiB: weights + the measured peak of decoding: the batch's cache with room for every "
            "new token, plus a decode step):",
            "",
        ]
        lines.append("| method | " + " | ".join(str(c) for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for name, cells in rows.items():
            vals = [
                "OOM" if cells.get(c, {}).get("oom") else f"{cells[c]['memory_bytes'] / GiB:.3f}" if c in cells else "-"
                for c in cols
            ]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        if result["max_batch"]:
            cap = result["memory_cap"] / GiB
            lines += ["", f"Largest batch within {cap:g} GiB:", ""]
            for name, mb in result["max_batch"].items():
                est = mb["estimated_max_batch"]
                line = f"- {name}: {mb['largest_tested_that_fits'] or 'none'} of the tested sizes"
                if est is not None:
                    line += f"; about {est} by a straight line through the measured memory"
                lines.append(line)
    files = [
        f"- {name}: {param} sha256 {sha}"
        for name, rec in result.get("methods", {}).items()
        for param, sha in rec["files"].items()
    ]
    if files:
        lines += ["", "Files the methods read:", "", *files]
    return "\n".join(lines) + "\n"
