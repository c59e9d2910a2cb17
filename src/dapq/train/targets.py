"""The targets learned queries are trained to: for each prompt, the model's own greedy answer's attention over the
prompt keys, per layer (the mean distribution and its top-B gold set), and the on-disk store that builds them once
and reuses them across epochs, reruns and tries (the kind of target LookaheadKV, arXiv 2603.10899, trains its
lookahead tokens to).

`--target recon` asks no answer at all: its target is KVzip's query-agnostic importance (Kim et al. 2025, arXiv
2505.23416, Sec. 3), the largest attention a prompt key receives while the model repeats the prompt, normalised to a
distribution, so the queries learn which keys a model needs to reproduce its context."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..analysis.quantities import attention_distribution, attention_probs, topk_indices
from ..errors import DapqError
from ..hf.capture import PromptState, greedy_answer, prefill_prompt, queries_at, trainable
from ..methods.kvzip import KVzip
from ..methods.scoring import aggregate_groups
from ..safefile import FileLock, ensure_dir, save_torch, write_json
from .generic import DEFAULT_TEXTS, drafts, finish, list_versions
from .settings import TrainSettings


@dataclass
class Example:
    """One prompt's per-layer targets, and its prefilled state (trainable cache) when it is kept in memory (the
    needle recipe's few prompts); None: prefilled again when used (the generic recipe's thousands)."""

    id: str
    ids: list[int]  # the prompt's token ids
    state: PromptState | None
    target: list[torch.Tensor]  # per layer [H_kv, L], rows sum to 1
    gold: list[torch.Tensor]  # per layer [H_kv, budget] key indices
    answer: str


def target_of(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, weights: torch.Tensor | None = None
) -> torch.Tensor:  # [H_kv, L]
    """Mean attention distribution of queries [H_q, n, D] over keys [H_kv, L, D] (softmax over the keys only),
    averaged over the queries (`attention_distribution`; `weights` [n]: a weighted mean instead) and each KV head's
    query group."""
    if weights is None:
        dist = attention_distribution(queries, keys, scaling)
    else:
        w = weights.to(queries.device, torch.float32)
        dist = torch.einsum("hnl,n->hl", attention_probs(queries, keys, scaling).float(), w / w.sum())
    return aggregate_groups(dist[None], keys.shape[0], "mean")[0]


def copy_weights(prompt_ids: list[int], answer: list[int]) -> torch.Tensor | None:  # [n]
    """The `copy` target's weights over the answer's n teacher-forced queries: query j (fed token a_j) writes
    a_{j+1}, and counts when the pair (a_j, a_{j+1}) occurs in the prompt, i.e. when that step continues a run of
    the context (copying, the steps whose keys must survive eviction; induction heads, Olsson et al., arXiv
    2209.11895). None when no step copies (the plain mean is used then)."""
    pairs = set(zip(prompt_ids, prompt_ids[1:]))
    w = [1.0 if (answer[j], answer[j + 1]) in pairs else 0.0 for j in range(len(answer) - 1)] + [0.0]
    return torch.tensor(w) if any(w) else None


RECON_BLOCK = 256  # reconstruction queries scored at a time (bounds the [H_q, block, L] attention in memory)


def recon_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:  # [H_kv, L]
    """KVzip's score of every prompt key: the largest softmax attention (over the prompt keys) it receives from any
    of the reconstruction queries [H_q, n, D] and any query head of its KV group; keys [H_kv, L, D]."""
    best = torch.zeros(queries.shape[0], keys.shape[1], device=queries.device)
    for start in range(0, queries.shape[1], RECON_BLOCK):
        probs = attention_probs(queries[:, start : start + RECON_BLOCK], keys, scaling)  # [H_q, block, L]
        best = torch.maximum(best, probs.amax(dim=1))
    return aggregate_groups(best[None], keys.shape[0], "max")[0]


def recon_example(model: Any, tokenizer: Any, prompt: Any, settings: TrainSettings, keep_state: bool) -> Example:
    """`--target recon`: the model is asked, on the full prompt cache, to repeat the prompt (KVzip's requests and
    chunks, `KVzip.pass_chunks`), and each layer's target is the keys' reconstruction scores (`recon_scores`, max over
    the chunks) divided by their sum. One difference from KVzip's own pass (`dapq.methods.kvzip`): the softmax runs
    over every prompt key, where KVzip's runs over its sinks, the chunk's span and the fed tokens' own keys. For a
    prompt of one chunk (up to 2,048 tokens after the template prefix) that changes each query's normalisation (the
    template prefix and the fed keys are left out), not which prompt key a query attends to most."""
    state = prefill_prompt(model, prompt.ids, keep_last=1)
    length = state.length
    scores: list[torch.Tensor] | None = None
    for chunk in KVzip(budget=1, n_sink=0).pass_chunks(list(prompt.ids), tokenizer):  # the chunks need no budget
        fed = queries_at(model, state, chunk.ids, range(length, length + len(chunk.ids))).queries
        layer_scores = [recon_scores(q, state.keys(i), state.scaling[i]) for i, q in enumerate(fed)]
        scores = layer_scores if scores is None else [torch.maximum(a, b) for a, b in zip(scores, layer_scores)]
    assert scores is not None  # a prompt has at least one chunk
    positive = [s.clamp_min(1e-12) for s in scores]
    target = [s / s.sum(dim=-1, keepdim=True) for s in positive]
    gold = [topk_indices(t, settings.budget) for t in target]
    kept = trainable(state) if keep_state else None
    return Example(prompt.id, list(prompt.ids), kept, target, gold, "")


def prompt_state(model: Any, ex: Example) -> PromptState:
    """The example's prompt cache: the kept one, or a fresh prefill (trainable) when none is kept."""
    return ex.state if ex.state is not None else trainable(prefill_prompt(model, ex.ids, keep_last=1))


def build_example(
    model: Any, tokenizer: Any, prompt: Any, settings: TrainSettings, stops: set[int], keep_state: bool = True
) -> Example:
    """One prompt's targets (`settings.target`): its greedy answer's attention (mean or copy), or `recon_example`."""
    if settings.target == "recon":
        return recon_example(model, tokenizer, prompt, settings, keep_state)
    state = prefill_prompt(model, prompt.ids, keep_last=1)
    answer = greedy_answer(model, state, settings.answer_tokens, stops)
    if not answer:  # the model stopped at once: its first non-stop token stands for the answer
        answer = greedy_answer(model, state, 1, set(), suppress_ids=stops)
    length = state.length
    real = queries_at(model, state, answer, range(length, length + len(answer))).queries
    target, gold = [], []
    weights = copy_weights(list(prompt.ids), answer) if settings.target == "copy" else None
    for i, q in enumerate(real):
        t = target_of(q, state.keys(i), state.scaling[i], weights)
        target.append(t)
        gold.append(topk_indices(t, settings.budget))
    kept = trainable(state) if keep_state else None
    return Example(prompt.id, list(prompt.ids), kept, target, gold, tokenizer.decode(answer))


class TargetStore:
    """The generic recipe's targets on disk, built once and reused by every epoch, rerun and try.

    `<out>.targets/` holds `store.json` (what the targets depend on: recipe, lengths, kinds, answer tokens, budget,
    seed, the model's name and config fingerprint) and one gzipped torch file per prompt (`00042.pt.gz`: the prompt
    ids, the per-layer targets in float16 and the gold sets; about 0.2 MB for a 2k-token prompt of the bundled
    model), written as soon as that prompt's targets exist: an interrupted build resumes at the first missing file.
    Prompt i is the same for any number of prompts (`dapq.train.generic.drafts`), so a larger --train extends a
    store. Files are read with weights_only=True; a store of other settings is refused."""

    def __init__(self, folder: Path, settings: TrainSettings, model_name: str, fingerprint: str):
        self.folder = folder
        self.settings = settings
        self.key = {
            "format": 1,
            "recipe": settings.recipe,
            "lengths": list(settings.lengths),
            "kinds": list(settings.kinds),
            "answer_tokens": settings.answer_tokens,
            "budget": settings.budget,
            "seed": settings.seed,
            "model": model_name,
            "model_fingerprint": fingerprint,
        }
        if settings.target != "mean":  # stores of the plain mean keep their old key
            self.key["target"] = settings.target
        if settings.texts != DEFAULT_TEXTS:  # so do stores of the default text
            self.key["texts"] = list(settings.texts)
            if "lists" in settings.texts:
                self.key["list_versions"] = list_versions()

    def _check(self) -> None:
        ensure_dir(self.folder, "the target store")
        meta = self.folder / "store.json"
        if meta.is_file():
            try:
                recorded = json.loads(meta.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                recorded = None
            if recorded != self.key:
                raise DapqError(
                    f"{self.folder} holds targets of other settings or another model: delete it, or train into "
                    "another --out."
                )
        else:
            write_json(meta, self.key)

    def path(self, i: int) -> Path:
        return self.folder / f"{i:05d}.pt.gz"

    def save(self, i: int, ex: Example) -> None:
        data = {
            "id": ex.id,
            "ids": torch.tensor(ex.ids, dtype=torch.int32),
            "target": torch.stack([t.to(torch.float16) for t in ex.target]),  # [layers, H_kv, L]
            "gold": torch.stack(ex.gold).to(torch.int32),  # [layers, H_kv, budget]
            "answer": ex.answer,
        }
        save_torch(self.path(i), data, compress=True)

    def load(self, i: int) -> Example:
        path = self.path(i)
        try:
            data = torch.load(io.BytesIO(gzip.decompress(path.read_bytes())), map_location="cpu", weights_only=True)
            target = [t.float() / t.float().sum(dim=-1, keepdim=True) for t in data["target"]]
            gold = [g.long() for g in data["gold"]]
            return Example(data["id"], data["ids"].tolist(), None, target, gold, data["answer"])
        except Exception as exc:  # torn, foreign or damaged: never trusted
            raise DapqError(
                f"{path} is not a complete target file ({type(exc).__name__}): delete it and rerun."
            ) from None

    def build(
        self,
        model: Any,
        tokenizer: Any,
        stops: set[int],
        progress: Callable[[str, int, int], None] | None,
        log: Callable[[str], None],
        build_only: bool = False,
    ) -> list[Example]:
        """Every prompt's example: loaded when its file exists, else built (the model writes selfqa questions,
        answers, targets) and written. `build_only`: build the missing prompts only, each after claiming it (a
        lock per prompt, `<i>.claim`, released when built or when the process dies), so that any number of
        processes can fill one store side by side, in order (one GPU holds many): nothing is loaded or returned."""
        self._check()
        s = self.settings
        planned = drafts(s.n_train + s.n_val, s.lengths, s.seed, s.kinds, s.texts)
        out, built = [], 0
        # a (non-shared) build's bars: prompts read from the store and prompts built now, apart, so that a resumed
        # build's rate and time left are those of building
        missing = 0 if build_only else sum(not self.path(i).is_file() for i in range(len(planned)))
        for i, draft in enumerate(planned):
            if build_only:
                built += self._build_claimed(i, draft, model, tokenizer, stops)
                if progress:
                    progress("targets (build only)", i + 1, len(planned))
                continue
            if self.path(i).is_file():
                out.append(self.load(i))
                if progress:
                    progress("targets read", len(out) - built, len(planned) - missing)
            else:
                prompt = finish(model, tokenizer, draft, s.lengths[1], stops)
                ex = build_example(model, tokenizer, prompt, s, stops, keep_state=False)
                self.save(i, ex)
                out.append(ex)
                built += 1
                if progress:
                    progress("targets", built, missing)
        if build_only:
            stored = sum(self.path(i).is_file() for i in range(len(planned)))
            log(f"targets: {built} built by this process; {stored} of {len(planned)} stored in {self.folder}")
            return out
        log(f"targets: {len(planned) - built} read from {self.folder}, {built} built")
        return out

    def _build_claimed(self, i: int, draft: Any, model: Any, tokenizer: Any, stops: set[int]) -> int:
        """Build prompt i unless it is stored or another process holds its claim; 1 when built here."""
        if self.path(i).is_file():
            return 0
        claim = FileLock(self.folder / f"{i:05d}.claim", remove=True)
        if not claim.acquire():
            return 0
        try:
            if self.path(i).is_file():  # finished by the claim's previous holder
                return 0
            prompt = finish(model, tokenizer, draft, self.settings.lengths[1], stops)
            self.save(i, build_example(model, tokenizer, prompt, self.settings, stops, keep_state=False))
            return 1
        finally:
            claim.release()
