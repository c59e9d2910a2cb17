"""Recall of observation windows (paper Figure 3, Eq. 1-3) and attention-distribution similarity (Table 8).

    dapq analyze recall     [--task summary --length 4096 --samples 4 --budget 128 --windows 1,2,4,...,128]
    dapq analyze attention  [same options]

For each prompt: one full prefill (keeping the last prompt queries), the model's greedy answer (`--answer-tokens`,
end-of-turn tokens suppressed) teacher-forced to capture the real decoding queries, and the queries of every
candidate window of w = 1..128 queries:
- `dapq[<content>]`: w pseudo tokens of that content at positions L..L+w-1 (DapQ's own `pseudo_ids`);
- `snapkv`: the last w prompt queries;
- `laq`: the first w lookahead queries decoded greedily on a SnapKV cache of `--budget` tokens (LAQ's stage 1,
  window min(32, budget / 2));
- `oracle`: the first w real decoding queries;
- `streamingllm`: no queries; its keep set (4 sinks + the most recent tokens, `--budget` in all) is scored directly.
The gold set of each (layer, KV head) is the top `--budget` prompt keys by the attention of all real answer queries
(Eq. 1); a window's predicted set is its top `--budget` (Eq. 2); recall = |gold ∩ pred| / |gold| (Eq. 3). Attention
similarity is the cosine between the window's mean attention distribution and the real queries' (per query head).
Both are averaged over heads, then layers, then prompts. Math: `dapq.analysis.quantities`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import compress, greedy_decode
from ..errors import DapqError
from ..extras import require
from ..hf.capture import greedy_answer, prefill_prompt, queries_at
from ..methods.base import get_method
from ..prompts import stop_token_ids
from ..safefile import save_figure
from .quantities import (
    attention_distribution,
    distribution_cosine,
    keep_set_recall,
    recall,
    topk_indices,
    window_scores,
)

WINDOWS = [1, 2, 4, 8, 16, 32, 64, 128]
CONTENTS = ["auto", "RS_C", "RC_C", "Fix_C", "random_vocab"]
# paper Table 8 (Llama-3-8B-Instruct, GovReport): attention-weight cosine per window size
PAPER_TABLE8 = {
    "dapq": {128: 0.9785, 64: 0.9747, 32: 0.9726, 16: 0.9713, 8: 0.9705, 4: 0.9644, 2: 0.9615, 1: 0.8768},
    "snapkv": {128: 0.9463, 64: 0.9429, 32: 0.9508, 16: 0.9466, 8: 0.9416, 4: 0.9385, 2: 0.9332, 1: 0.8426},
}


def _lookahead_queries(model: Any, tokenizer: Any, prompt: list[int], budget: int, n: int) -> list[torch.Tensor]:
    """LAQ's lookahead queries: n tokens decoded greedily on a SnapKV cache of `budget` tokens (per layer
    [H_q, n, D], rotated at positions L..L+n-1). Greedy, so the first w of them are the w-token lookahead."""
    laq = get_method("laq")  # its defaults: stage-1 window 32 (at most half the budget here), max pool 7
    window = max(1, min(laq.stage1_window, budget // 2))
    snap = get_method("snapkv", budget=budget, window=window, pooling=laq.pooling, kernel=laq.kernel)
    cc = compress(model, tokenizer, [prompt], snap)
    cc.state.start_capture()
    greedy_decode(cc, cc.first_logits, n + 1, set())  # n forward steps at L .. L+n-1
    return [cc.state.captured_queries(i)[0].float() for i in range(cc.state.n_layers)]


def streaming_keep(length: int, budget: int, sinks: int = 4) -> torch.Tensor:  # [L] bool
    keep = torch.zeros(length, dtype=torch.bool)
    keep[: min(sinks, budget)] = True
    recent = max(0, budget - sinks)
    if recent:
        keep[length - recent :] = True
    return keep


def analyse_prompt(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    *,
    budget: int,
    windows: list[int],
    contents: list[str],
    answer_tokens: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall and attention similarity of every window for one prompt: {"recall": {method: {w: value}},
    "recall_per_layer": {method: {w: [per layer]}}, "attention": {method: {w: value}}, ...}."""
    max_w = max(windows)
    if budget >= len(prompt):
        raise DapqError(f"--budget ({budget}) must be smaller than the prompt ({len(prompt)} tokens).")
    state = prefill_prompt(model, prompt, keep_last=max_w)
    length = state.length
    answer = greedy_answer(model, state, answer_tokens, set(), suppress_ids=stop_token_ids(tokenizer))
    real = queries_at(model, state, answer, range(length, length + len(answer))).queries  # per layer [H_q, n, D]
    n_layers = len(real)
    keys = [state.keys(i) for i in range(n_layers)]  # [H_kv, L, D]
    scaling = state.scaling
    gold = [topk_indices(window_scores(real[i], keys[i], scaling[i]), budget) for i in range(n_layers)]
    gold_dist = [attention_distribution(real[i], keys[i], scaling[i]) for i in range(n_layers)]

    vocab = model.get_input_embeddings().weight.shape[0]
    windows_q: dict[str, dict[int, list[torch.Tensor]]] = {}
    for content in contents:
        name = f"dapq[{content}]"
        windows_q[name] = {}
        for w in windows:
            method = get_method("dapq", budget=budget, n_pseudo_tokens=w, content=content, seed=seed)
            ids = method.pseudo_ids(list(prompt), vocab, tokenizer)
            windows_q[name][w] = queries_at(model, state, ids, method.pseudo_positions(length)).queries
    windows_q["snapkv"] = {w: [q[:, -w:] for q in state.prompt_queries] for w in windows}
    windows_q["oracle"] = {w: [q[:, :w] for q in real] for w in windows if w <= len(answer)}
    look = _lookahead_queries(model, tokenizer, prompt, budget, max_w)
    windows_q["laq"] = {w: [q[:, :w] for q in look] for w in windows}

    rec: dict[str, dict[int, float]] = {}
    rec_layers: dict[str, dict[int, list[float]]] = {}
    att: dict[str, dict[int, float]] = {}
    for name, by_w in windows_q.items():
        rec[name], rec_layers[name], att[name] = {}, {}, {}
        for w, qs in by_w.items():
            per_layer = [
                float(recall(gold[i], topk_indices(window_scores(qs[i], keys[i], scaling[i]), budget)).mean())
                for i in range(n_layers)
            ]
            rec[name][w] = sum(per_layer) / n_layers
            rec_layers[name][w] = per_layer
            cos = [
                float(distribution_cosine(attention_distribution(qs[i], keys[i], scaling[i]), gold_dist[i]).mean())
                for i in range(n_layers)
            ]
            att[name][w] = sum(cos) / n_layers
    keep = streaming_keep(length, budget)
    slm = [float(keep_set_recall(gold[i], keep).mean()) for i in range(n_layers)]
    rec["streamingllm"] = {w: sum(slm) / n_layers for w in windows}
    rec_layers["streamingllm"] = {w: slm for w in windows}
    return {
        "length": length,
        "answer": tokenizer.decode(answer),
        "answer_tokens": len(answer),
        "recall": rec,
        "recall_per_layer": rec_layers,
        "attention": att,
    }


def run_windows(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, list[int]]],
    *,
    budget: int = 128,
    windows: list[int] | None = None,
    contents: list[str] | None = None,
    answer_tokens: int = 128,
    seed: int = 0,
    progress: Any = None,
    done: dict[str, Any] | None = None,
    on_result: Any = None,
) -> dict[str, Any]:
    """`analyse_prompt` over `prompts`, averaged (JSON-able). `done` holds per-prompt results of an interrupted
    run (by prompt id; they are reused), `on_result(id, result)` is called after each new prompt (to save it)."""
    windows = sorted(windows or WINDOWS)
    contents = contents or CONTENTS
    if not prompts:
        raise DapqError("No prompts to analyse.")
    if any(not isinstance(w, int) or w < 1 for w in windows):
        raise DapqError(f"--windows must be positive integers; got {windows}")
    per = []
    done = done or {}
    for i, (pid, prompt) in enumerate(prompts):
        if pid in done:
            per.append(done[pid])
            continue
        r = analyse_prompt(
            model,
            tokenizer,
            prompt,
            budget=budget,
            windows=windows,
            contents=contents,
            answer_tokens=answer_tokens,
            seed=seed,
        )
        r = _json_keys({"id": pid, **r})
        per.append(r)
        if on_result:
            on_result(pid, r)
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)} ({r['length']} tokens)")
    return {
        "budget": budget,
        "windows": windows,
        "answer_tokens": answer_tokens,
        "recall": _average([p["recall"] for p in per], windows),
        "recall_per_layer": _average_layers([p["recall_per_layer"] for p in per], windows),
        "attention": _average([p["attention"] for p in per], windows),
        "per_prompt": per,
    }


def _json_keys(obj: Any) -> Any:
    """Window sizes as string keys, as JSON stores them (so fresh and resumed results look the same)."""
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    return obj


def _average(items: list[dict[str, dict[str, float]]], windows: list[int]) -> dict[str, dict[int, float]]:
    """Mean over prompts per method and window (prompts whose answer was shorter than w have no oracle at w)."""
    out: dict[str, dict[int, float]] = {}
    for name in items[0]:
        out[name] = {}
        for w in windows:
            vals = [it[name][str(w)] for it in items if str(w) in it.get(name, {})]
            if vals:
                out[name][w] = sum(vals) / len(vals)
    return out


def _average_layers(
    items: list[dict[str, dict[str, list[float]]]], windows: list[int]
) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {}
    for name in items[0]:
        out[name] = {}
        for w in windows:
            rows = [it[name][str(w)] for it in items if str(w) in it.get(name, {})]
            if rows:
                out[name][w] = [sum(col) / len(col) for col in zip(*rows)]
    return out


def markdown(result: dict[str, Any], quantity: str) -> str:
    """Window sizes as columns (largest first, as the paper), methods as rows; Table 8 adds the paper's rows."""
    windows = sorted(result["windows"], reverse=True)
    data = result[quantity]
    title = "Recall of the gold set (Eq. 3)" if quantity == "recall" else "Attention-distribution cosine (Table 8)"
    lines = [
        f"{title}, budget {result['budget']}, {len(result['per_prompt'])} prompt(s), "
        f"answers of {result['answer_tokens']} tokens.",
        "",
        "| method | " + " | ".join(str(w) for w in windows) + " |",
        "|---|" + "---|" * len(windows),
    ]
    for name, by_w in data.items():
        cells = [f"{by_w[w]:.4f}" if w in by_w else "-" for w in windows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if quantity == "attention":
        for name, by_w in PAPER_TABLE8.items():
            cells = [f"{by_w[w]:.4f}" if w in by_w else "-" for w in windows]
            lines.append(f"| paper: {name} (Llama-3-8B) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], quantity: str, path: str) -> None:
    """Figure 3 in the paper's style: the quantity vs window size (log2 axis), one line per method."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, by_w in result[quantity].items():
        ws = sorted(by_w)
        style = "--" if name in ("streamingllm", "oracle") else "-"
        ax.plot(ws, [by_w[w] for w in ws], style, marker="o", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window size (queries)")
    ax.set_ylabel("recall" if quantity == "recall" else "attention cosine")
    ax.set_title(("Recall" if quantity == "recall" else "Attention similarity") + f", budget {result['budget']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
