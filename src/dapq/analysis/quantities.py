"""The paper's analysis quantities as pure tensor math (no transformers): query cosine, recall, attention similarity.

Definitions (the DapQ paper, Tian et al., arXiv 2603.11564, Sections 3.1-3.3 and Appendix C.2):
- query similarity (Table 1, Fig. 2): cosine between a pseudo query and the real decoding query at the same index
  i of the window (q_pseudo_i vs q_real_i), averaged over tokens, heads and layers;
- recall (Eq. 1-3): the gold set is the top-B prompt keys by attention summed over the real response's queries;
  a window's predicted set is the top-B by attention summed over the window's queries; recall = |gold ∩ pred| / B;
- attention similarity (Table 8): cosine between the window's attention distribution over the prompt (mean of its
  queries' softmax attention) and the real decoding queries' distribution.

Choices the paper leaves open, fixed here: softmax is taken over the prompt keys only (the eviction candidates),
for real and pseudo queries alike; top-B sets are per KV head with per-query-head scores averaged over the GQA
group (as the methods' default `gqa="mean"`); recall and attention similarity are averaged over heads per layer.
Shapes: queries [H_q, w, D], keys [H_kv, L, D], per-head scores [H, L].
"""

from __future__ import annotations

import torch


def query_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [H, n]
    """Cosine between a[h, i] and b[h, i]; a and b are [H, n, D] (the same n)."""
    if a.shape != b.shape:
        raise ValueError(f"query sets must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def mean_query_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, list[float]]:
    """(mean over layers, heads and tokens; per-layer means) for per-layer query sets [H, n, D]."""
    per_layer = [float(query_cosine(x, y).mean()) for x, y in zip(a, b)]
    return sum(per_layer) / len(per_layer), per_layer


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:  # [H_q, w, L]
    """Softmax attention (fp32) of queries [H_q, w, D] over keys [H_kv, L, D] (GQA: keys shared by groups)."""
    h_q, w, d = queries.shape
    h_kv = keys.shape[0]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    g = h_q // h_kv
    logits = torch.matmul(queries.float().reshape(h_kv, g * w, d), keys.float().transpose(-1, -2)) * scaling
    return torch.softmax(logits, dim=-1).reshape(h_q, w, -1)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:  # [H_kv, L]
    """Eq. 1/2 scores: attention summed over the window's queries, averaged over each KV head's query group."""
    probs = attention_probs(queries, keys, scaling).sum(dim=1)  # [H_q, L]
    h_kv = keys.shape[0]
    return probs.reshape(h_kv, -1, probs.shape[-1]).mean(dim=1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:  # [H, k]
    """The top-k key indices per head (stable: ties go to the earlier key)."""
    k = min(k, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def recall(gold: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:  # [H]
    """Eq. 3 per head: |gold ∩ pred| / |gold| for index sets gold [H, k] and pred [H, k']."""
    hits = (pred[:, :, None] == gold[:, None, :]).any(dim=1)  # [H, k] gold index found in pred
    return hits.float().mean(dim=-1)


def keep_set_recall(gold: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # [H]
    """Recall of a fixed keep mask [L] bool (e.g. StreamingLLM's sinks + recent) against gold [H, k]."""
    return keep[gold].float().mean(dim=-1)


def attention_distribution(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:  # [H_q, L]
    """A window's attention distribution over the prompt: the mean of its queries' softmax rows (sums to 1)."""
    return attention_probs(queries, keys, scaling).mean(dim=1)


def distribution_cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # [H]
    """Cosine between two per-head distributions [H, L] (Table 8)."""
    return torch.nn.functional.cosine_similarity(p.float(), q.float(), dim=-1)
