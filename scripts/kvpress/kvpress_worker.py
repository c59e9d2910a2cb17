"""The kvpress side of scripts/kvpress/vs_kvpress.py. Runs INSIDE .venv-kvpress (kvpress + its transformers), never
imports dapq, and is started by vs_kvpress.py:

    .venv-kvpress/bin/python scripts/kvpress/kvpress_worker.py JOB.json OUT_PREFIX

JOB.json (written by vs_kvpress.py in our env): the model file, the prompts as token ids (so both sides see identical
ids), the stop token ids, max_new_tokens and the (method, budget) configs. For every sample and config this does
what kvpress's own pipeline does (`with press(model): model.model(...)`, then greedy decoding at positions L, L+1, ...),
except that the WHOLE prompt (context + question + answer prefix) goes through the compressed prefill (query-aware),
and the first answer token comes from the prefill's last logits (computed before each layer is compressed, as in dapq).

Writes OUT_PREFIX.json (tokens, timings, kept counts per layer, versions) and OUT_PREFIX.pt (kept indices per layer and
KV head, recovered by matching the pruned keys against the full keys; the matching is outside the timed region).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch


def load(model_file: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = Path(model_file)
    with contextlib.redirect_stderr(io.StringIO()):  # GGUF de-quantisation prints progress bars
        if path.is_file():  # a GGUF file
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
            )
        else:  # a folder written by save_pretrained (fallback if GGUF loading is not available)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), tok


def weights_sha(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def ratio_for(budget: int, length: int) -> float:
    """compression_ratio such that kvpress keeps exactly `budget` tokens per head of a `length`-token prompt:
    kvpress keeps int(L * (1 - r)) (ScorerPress) / round(L * (1 - r)) (PyramidKV fallback); with
    r = 1 - (B + 0.25) / L both give B (the 0.25 absorbs float error on either side)."""
    return 1.0 - (budget + 0.25) / length


def kvzip_ratio(budget: int, length: int, n_layers: int, heads: int, layerwise: bool) -> float:
    """compression_ratio such that KVzipPress keeps exactly `budget` x heads (x layers, layerwise=False) entries:
    it prunes int(total * r) of the total; r = 1 - (keep - 0.5) / total makes that total - keep."""
    total = heads * length * (1 if layerwise else n_layers)
    keep = heads * budget * (1 if layerwise else n_layers)
    return 1.0 - (keep - 0.5) / total


def make_press(method: str, budget: int, length: int, p: dict, model=None):
    from kvpress import ExpectedAttentionPress, KVzipPress, PyramidKVPress, SnapKVPress, StreamingLLMPress

    window, kernel, sinks, beta = p["window"], p["kernel"], p["sinks"], p["beta"]
    r = ratio_for(budget, length)
    if method == "snapkv":
        return SnapKVPress(compression_ratio=r, window_size=window, kernel_size=kernel)
    if method == "pyramidkv":
        return PyramidKVPress(compression_ratio=r, window_size=window, kernel_size=kernel, beta=beta)
    if method == "streamingllm":
        return StreamingLLMPress(compression_ratio=r, n_sink=sinks)
    if method == "expected_attention":  # its defaults (use_covariance, use_vnorm, epsilon 0); n_sink 4, 512 positions
        return ExpectedAttentionPress(
            compression_ratio=r, n_sink=sinks, n_future_positions=p.get("n_future_positions", 512)
        )
    if method in ("kvzip", "kvzip_layerwise"):  # its defaults: n_sink 4, chunks of 2,048 tokens
        layerwise = method == "kvzip_layerwise"
        cfg = model.config
        r = kvzip_ratio(budget, length, cfg.num_hidden_layers, cfg.num_key_value_heads, layerwise)
        return KVzipPress(compression_ratio=r, layerwise=layerwise, n_sink=sinks, chunk_size=p.get("chunk_size", 2048))
    raise ValueError(f"unknown method {method!r}")


def kvzip_kept(model, length: int) -> list[torch.Tensor]:
    """Per layer the kept indices per KV head (padded with -1): the complement of the keys KVzipPress masks
    (`module.masked_key_indices`, its fake compression)."""
    out = []
    for layer in model.model.layers:
        module = layer.self_attn
        heads = module.config.num_key_value_heads
        keep = torch.ones(heads, length, dtype=torch.bool)
        _, h_idx, s_idx = module.masked_key_indices
        keep[h_idx.cpu(), s_idx.cpu()] = False
        k = int(keep.sum(-1).max())
        idx = torch.full((heads, k), -1, dtype=torch.long)
        for h in range(heads):
            kept = keep[h].nonzero().squeeze(-1)
            idx[h, : len(kept)] = kept
        out.append(idx)
    return out


def recover_indices(keys_in: torch.Tensor, keys_out: torch.Tensor) -> torch.Tensor:
    """Indices [H, k] (ascending) of the rows of keys_in [1, H, L, D] that keys_out [1, H, k, D] holds.

    kvpress gathers keys, so every kept row is an exact copy of a full row: match a random projection exactly, then
    verify the whole rows (falls back to a full row comparison if two full rows project to the same value)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(keys_in.shape[-1], 1, generator=gen, dtype=torch.float64)
    out = []
    for h in range(keys_in.shape[1]):
        full, kept = keys_in[0, h].double(), keys_out[0, h].double()
        a, b = (full @ v)[:, 0], (kept @ v)[:, 0]
        order = torch.argsort(a)
        pos = torch.searchsorted(a[order], b).clamp(max=len(a) - 1)
        idx = order[pos]
        if not torch.equal(full[idx], kept) or len(set(idx.tolist())) != len(idx):
            eq = (kept[:, None, :] == full[None, :, :]).all(-1)  # [k, L]
            idx = eq.float().argmax(-1)
            assert bool(eq.any(-1).all()), "a kept key matches no full key"
        out.append(torch.sort(idx).values)
    return torch.stack(out)  # [H, k]


def run_one(model, ids: list[int], press, stop_ids: set[int], max_new_tokens: int):
    from transformers import DynamicCache

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if press is not None:
        original = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            new_keys, new_values = original(module, hidden_states, keys, values, attentions, kwargs)
            captured[module.layer_idx] = (keys, new_keys)  # references only: matched after the timed region
            return new_keys, new_values

        press.compress = compress
    input_ids = torch.tensor([ids])
    length = len(ids)
    cache = DynamicCache()
    start, cpu = time.perf_counter(), time.process_time()
    # inference mode OUTSIDE the press: KVzipPress runs its reconstruction passes when its context exits
    with torch.inference_mode(), press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
    prefill_s, prefill_cpu = time.perf_counter() - start, time.process_time() - cpu
    if type(press).__name__ == "KVzipPress":  # fake compression: the full cache stays, pruned keys are masked
        kept = kvzip_kept(model, length)
        kept_counts = [int((k >= 0).sum(-1).float().mean()) for k in kept]
    else:
        kept = [recover_indices(*captured[i]) for i in sorted(captured)] if press is not None else []
        kept_counts = [cache.layers[i].keys.shape[2] for i in range(len(cache.layers))]
    start, cpu = time.perf_counter(), time.process_time()
    tokens: list[int] = []
    logits = out.logits[0, -1]
    with torch.inference_mode():
        for step in range(max_new_tokens):  # greedy, positions L, L+1, ... as kvpress's pipeline
            tok = int(logits.argmax())
            if tok in stop_ids:
                break
            tokens.append(tok)
            if step == max_new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[tok]]),
                past_key_values=cache,
                position_ids=torch.tensor([[length + step]]),
            )
            logits = out.logits[0, -1]
    decode_s, decode_cpu = time.perf_counter() - start, time.process_time() - cpu
    return (
        tokens,
        {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_cpu_s": prefill_cpu, "decode_cpu_s": decode_cpu},
        kept,
        kept_counts,
    )


def main() -> None:
    job_path, out_prefix = sys.argv[1], sys.argv[2]
    job = json.loads(Path(job_path).read_text())
    t0 = time.perf_counter()
    model, tok = load(job["model_file"])
    # KVzipPress loads the tokenizer from model.config.name_or_path, which cannot name a GGUF file: hand it ours
    from kvpress.presses import kvzip_press

    kvzip_press.AutoTokenizer.from_pretrained = lambda *a, **k: tok
    load_s = time.perf_counter() - t0
    p = job["params"]
    stop_ids = set(job["stop_ids"])
    results, kept_all = [], {}
    # warm-up (one-time allocator / kernel start-up costs), not recorded
    run_one(model, job["samples"][0]["ids"][:256], None, stop_ids, 2)
    for s_idx, sample in enumerate(job["samples"]):
        ids = sample["ids"]
        for method, budget in [("full", None)] + [tuple(c) for c in job["configs"]]:
            press = None if method == "full" else make_press(method, budget, len(ids), p, model)
            tokens, times, kept, counts = run_one(model, ids, press, stop_ids, job["max_new_tokens"])
            key = f"{method}@{budget}"
            results.append(
                {
                    "sample": s_idx,
                    "config": key,
                    "method": method,
                    "budget": budget,
                    "compression_ratio": None if press is None else press.compression_ratio,
                    "tokens": tokens,
                    **times,
                    "kept_per_layer": counts,
                }
            )
            if kept:
                kept_all[f"{s_idx}|{key}"] = [k.to(torch.int16) for k in kept]
            print(f"kvpress sample {s_idx} {key}: prefill {times['prefill_s']:.2f}s decode {times['decode_s']:.2f}s")
    versions = {name: md.version(name) for name in ("kvpress", "transformers", "torch")}
    meta = {"versions": versions, "weights_sha256": weights_sha(model), "load_s": load_s}
    meta["torch_threads"] = torch.get_num_threads()
    meta["prompt_sha1"] = [hashlib.sha1(json.dumps(s["ids"]).encode()).hexdigest() for s in job["samples"]]
    Path(out_prefix + ".json").write_text(json.dumps({"meta": meta, "results": results}))
    torch.save(kept_all, out_prefix + ".pt")


if __name__ == "__main__":
    main()
