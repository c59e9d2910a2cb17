"""Query similarity: the paper's Table 1 and Figure 2a/2b ("where matters more than what"), on any model.

    dapq analyze similarity [--task summary --length 4096 --trials 100 --offset-lengths 1024,2048,4096]

The real decoding queries are those of the model's own greedy answer (its first N tokens, end-of-turn tokens
suppressed), teacher-forced after the prompt at positions L..L+N-1 and captured per layer and head, before and after
RoPE (`dapq.hf.capture`). Pseudo queries are the same forward with other content and/or other position ids; they
follow the prompt in sequence order (they see the whole prompt) whatever their position ids.

- Table 1: SC/DC x SP/DP with DC = a fixed nonsense sentence ("Sorry, I don't know. ..."), DP = positions 0..N-1;
  post- and pre-RoPE cosine (mean over layers, heads and the N tokens, pairing token i with token i).
- Figure 2a: `trials` draws with DC = N random vocabulary tokens and DP = a random consecutive span inside [0, L)
  or inside the far range [0, 100); box plots of the post-RoPE cosine per condition.
- Figure 2b: the offset curve: real content at start positions s (s..s+N-1) swept over [0, L + N*8], for several
  context lengths; the peak should sit at s = L.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DapqError
from ..extras import require
from ..hf.capture import PromptState, greedy_answer, prefill_prompt, queries_at, to_pre_rope
from ..prompts import stop_token_ids
from ..safefile import save_figure
from .quantities import mean_query_cosine

FIXED_TEXT = "Sorry, I don't know. "
# Table 1 of the paper (Llama-3-8B-Instruct, one 4,424-token GovReport example): (post-RoPE, pre-RoPE)
PAPER_TABLE1 = {"SC&SP": (1.0, 1.0), "DC&SP": (0.7238, 0.7238), "SC&DP": (0.3522, 0.7913), "DC&DP": (0.3267, 0.7434)}


def fixed_ids(tokenizer: Any, n: int, text: str = FIXED_TEXT) -> list[int]:
    """The first n tokens of `text` repeated (the paper's "Sorry, I don't know. Sorry, I ..." content)."""
    unit = tokenizer.encode(text, add_special_tokens=False)
    if not unit:
        raise DapqError(f"The fixed text {text!r} has no tokens.")
    return (unit * (n // len(unit) + 1))[:n]


@dataclass
class Reference:
    """The real decoding queries of one prompt: N answer tokens at L..L+N-1, post- and pre-RoPE."""

    state: PromptState
    answer: list[int]
    post: list[torch.Tensor]  # per layer [H_q, N, D]
    pre: list[torch.Tensor] | None  # None when the model's RoPE cannot be undone (several rotary modules)


def reference(model: Any, tokenizer: Any, prompt: list[int], n: int, keep_last: int = 0) -> Reference:
    """Prefill `prompt`, take the model's greedy answer (n tokens), capture its teacher-forced queries."""
    state = prefill_prompt(model, prompt, keep_last=max(keep_last, 1))
    stops = stop_token_ids(tokenizer)
    answer = greedy_answer(model, state, n, set(), suppress_ids=stops)
    real = queries_at(model, state, answer, range(state.length, state.length + len(answer)))
    return Reference(state, answer, real.queries, _pre(model, real))


def _pre(model: Any, captured: Any) -> list[torch.Tensor] | None:
    try:
        return to_pre_rope(model, captured.queries, captured.positions)
    except DapqError:
        return None


def compare(model: Any, ref: Reference, ids: list[int], start: int) -> tuple[float, float | None]:
    """(post-RoPE, pre-RoPE) mean cosine of `ids` at positions start.. against the real queries."""
    n = len(ref.answer)
    got = queries_at(model, ref.state, ids[:n], range(start, start + n))
    post, _ = mean_query_cosine(got.queries, ref.post)
    pre_q = _pre(model, got) if ref.pre is not None else None
    pre = mean_query_cosine(pre_q, ref.pre)[0] if pre_q is not None and ref.pre is not None else None
    return post, pre


def table1(model: Any, tokenizer: Any, ref: Reference, fixed_text: str = FIXED_TEXT) -> dict[str, dict[str, Any]]:
    """The four conditions of Table 1 for one prompt: {condition: {"post": cos, "pre": cos or None}}."""
    n, length = len(ref.answer), ref.state.length
    dc = fixed_ids(tokenizer, n, fixed_text)
    conditions = [("SC&SP", ref.answer, length), ("DC&SP", dc, length), ("SC&DP", ref.answer, 0), ("DC&DP", dc, 0)]
    out = {}
    for name, ids, start in conditions:
        post, pre = compare(model, ref, ids, start)
        out[name] = {"post": post, "pre": pre}
    return out


def distributions(model: Any, ref: Reference, vocab_size: int, trials: int, seed: int = 0) -> dict[str, list[float]]:
    """Figure 2a: post-RoPE cosines over `trials` random draws per condition (DC: random vocabulary tokens;
    DP: a random span inside [0, L) or inside the far range [0, 100))."""
    n, length = len(ref.answer), ref.state.length
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in ("DC&SP", "SC&DP[0,L)", "DC&DP[0,L)", "SC&DP[0,100)", "DC&DP[0,100)")}
    for _ in range(trials):
        dc = [rng.randrange(vocab_size) for _ in range(n)]
        far = rng.randrange(0, max(1, 100 - n + 1))
        near = rng.randrange(0, max(1, length - n + 1))
        out["DC&SP"].append(compare(model, ref, dc, length)[0])
        out["SC&DP[0,L)"].append(compare(model, ref, ref.answer, near)[0])
        out["DC&DP[0,L)"].append(compare(model, ref, dc, near)[0])
        out["SC&DP[0,100)"].append(compare(model, ref, ref.answer, far)[0])
        out["DC&DP[0,100)"].append(compare(model, ref, dc, far)[0])
    return out


def offset_curve(model: Any, ref: Reference, points: int, max_positions: int | None) -> dict[str, list[float]]:
    """Figure 2b: the real content at start positions s swept over [0, L + 8N] (denser near L); returns starts and
    post-RoPE cosines."""
    n, length = len(ref.answer), ref.state.length
    hi = length + 8 * n
    if max_positions is not None:
        hi = min(hi, max_positions - n)
    grid = {int(round(i * hi / (points - 1))) for i in range(points)}
    near = {length + sign * 2**k for k in range(9) for sign in (-1, 1)}  # dense around the real position
    starts = sorted(s for s in grid | near | {length} if 0 <= s <= hi)
    return {"start": starts, "cosine": [compare(model, ref, ref.answer, s)[0] for s in starts]}


def run_similarity(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, list[int]]],
    offset_prompts: list[tuple[str, list[int]]],
    *,
    n_tokens: int = 32,
    trials: int = 100,
    points: int = 25,
    seed: int = 0,
    fixed_text: str = FIXED_TEXT,
    progress: Any = None,
    done: dict[str, Any] | None = None,
    on_result: Any = None,
) -> dict[str, Any]:
    """Table 1 (mean over `prompts`), Figure 2a (trials on the first prompt) and Figure 2b (one curve per
    `offset_prompts` entry). Returns a JSON-able dict. `done` holds the items of an interrupted run (keys
    "table1:<id>", "distributions", "curve:<id>"), `on_result(key, item)` is called after each new item."""
    done = done or {}

    def keep(key: str, item: Any) -> Any:
        if on_result:
            on_result(key, item)
        return item

    if not prompts:
        raise DapqError("No prompts to analyse.")
    vocab = model.get_input_embeddings().weight.shape[0]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    rows = []
    dist: dict[str, list[float]] = done.get("distributions", {})
    for i, (pid, prompt) in enumerate(prompts):
        need_dist = i == 0 and trials and "distributions" not in done
        if f"table1:{pid}" in done and not need_dist:
            rows.append(done[f"table1:{pid}"])
            continue
        ref = reference(model, tokenizer, prompt, n_tokens)
        if f"table1:{pid}" in done:
            rows.append(done[f"table1:{pid}"])
        else:
            row = {"id": pid, "length": len(prompt), "answer": tokenizer.decode(ref.answer)}
            rows.append(keep(f"table1:{pid}", {**row, **table1(model, tokenizer, ref, fixed_text)}))
        if need_dist:
            dist = keep("distributions", distributions(model, ref, vocab, trials, seed))
        if progress:
            progress(f"table 1: prompt {i + 1}/{len(prompts)}")
    curves = []
    for pid, prompt in offset_prompts:
        if f"curve:{pid}" in done:
            curves.append(done[f"curve:{pid}"])
            continue
        ref = reference(model, tokenizer, prompt, n_tokens)
        curves.append(
            keep(f"curve:{pid}", {"id": pid, "length": len(prompt), **offset_curve(model, ref, points, max_pos)})
        )
        if progress:
            progress(f"offset curve: {len(prompt)} tokens")
    table = {}
    for cond in PAPER_TABLE1:
        posts = [r[cond]["post"] for r in rows]
        pres = [r[cond]["pre"] for r in rows if r[cond]["pre"] is not None]
        table[cond] = {
            "post": sum(posts) / len(posts),
            "pre": sum(pres) / len(pres) if pres else None,
            "paper_post": PAPER_TABLE1[cond][0],
            "paper_pre": PAPER_TABLE1[cond][1],
        }
    return {
        "n_tokens": n_tokens,
        "trials": trials,
        "seed": seed,
        "fixed_text": fixed_text,
        "table1": table,
        "per_prompt": rows,
        "distributions": dist,
        "offset_curves": curves,
    }


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown(result: dict[str, Any]) -> str:
    """Table 1 (ours next to the paper's) and the Figure 2a medians, as markdown."""
    lines = [
        f"Query cosine, N = {result['n_tokens']} tokens, mean over {len(result['per_prompt'])} prompt(s).",
        "",
        "| condition | post-RoPE (ours) | pre-RoPE (ours) | post-RoPE (paper) | pre-RoPE (paper) |",
        "|---|---|---|---|---|",
    ]
    for cond, v in result["table1"].items():
        lines.append(f"| {cond} | {_f(v['post'])} | {_f(v['pre'])} | {v['paper_post']:.4f} | {v['paper_pre']:.4f} |")
    if result["distributions"]:
        lines += [
            "",
            f"Figure 2a ({result['trials']} trials): post-RoPE cosine",
            "",
            "| condition | median | min | max |",
            "|---|---|---|---|",
        ]
        for cond, vals in result["distributions"].items():
            t = torch.tensor(vals)
            lines.append(f"| {cond} | {float(t.median()):.4f} | {float(t.min()):.4f} | {float(t.max()):.4f} |")
    for c in result["offset_curves"]:
        best = max(range(len(c["start"])), key=lambda k: c["cosine"][k])
        lines.append("")
        lines.append(
            f"Offset curve, {c['length']} tokens: peak {c['cosine'][best]:.4f} at start {c['start'][best]} "
            f"(the real position is {c['length']})."
        )
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: str) -> None:
    """Figure 2 in the paper's style: (a) box plots per condition, (b) offset curves per context length."""
    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    dist = result["distributions"]
    if dist:
        axes[0].boxplot(list(dist.values()), tick_labels=list(dist.keys()))
        axes[0].tick_params(axis="x", labelrotation=20)
    axes[0].set_title(f"(a) query cosine, {result['trials']} trials (post-RoPE)")
    axes[0].set_ylabel("cosine similarity")
    for c in result["offset_curves"]:
        axes[1].plot(c["start"], c["cosine"], marker=".", label=f"{c['length']} tokens")
        axes[1].axvline(c["length"], color="grey", linewidth=0.6, linestyle=":")
    axes[1].set_title("(b) offset: start position of the real content")
    axes[1].set_xlabel("start position assigned to the queries")
    axes[1].set_ylabel("cosine similarity")
    if result["offset_curves"]:
        axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
