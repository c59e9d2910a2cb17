"""One run of the paper's observations (`dapq analyze`): query similarity (Table 1, Fig. 2a/2b), window recall
(Fig. 3) or attention-distribution cosine (Table 8) of DapQ (arXiv 2603.11564, Sec. 3), inside a run folder.

The folder records its configuration (run.json, as `dapq eval` folders do); per-prompt results are appended to
items.jsonl as they finish, so an interrupted run resumes where it stopped; the result is written as <kind>.json,
<kind>.md and <kind>.png.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..runs import RunConfig, RunLock, open_run
from ..safefile import write_text
from .checkpoint import Checkpoint
from .sources import analysis_prompts

KINDS = ("similarity", "recall", "attention")


@dataclass(frozen=True)
class Observation:
    """What one `dapq analyze <kind>` run measures: the prompts (task, length, samples, seed, data folder) and the
    kind's own settings; `config` is what the folder and the result record."""

    kind: str
    task: str = "summary"
    length: int = 4096
    samples: int | None = None  # default: 1 for similarity, else 4
    seed: int = 0
    data_dir: str | None = None
    # similarity
    tokens: int = 32
    trials: int = 100
    points: int = 25
    offset_lengths: tuple[int, ...] = ()
    # recall / attention
    budget: int = 128
    windows: tuple[int, ...] = ()
    contents: tuple[str, ...] = ()
    answer_tokens: int = 128
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DapqError(f"Unknown analysis {self.kind!r}; choose one of {', '.join(KINDS)}.")


def open_folder(obs: Observation, out: str | Path, model: str, model_id: str) -> Path:
    """The run folder of `obs` (created with its run.json, or an earlier one with the same settings)."""
    settings = RunConfig(
        model=model,
        model_id=model_id,
        seed=obs.seed,
        extra={k: v for k, v in obs.config.items() if k not in ("model", "seed", "samples")},
    )
    return open_run(out, settings)


def run_observation(
    obs: Observation,
    folder: Path,
    load: Callable[[], tuple[Any, Any]],
    progress: Callable[[str], None] = lambda msg: None,
    on_resume: Callable[[int], None] = lambda n: None,
) -> str:
    """Run `obs` in `folder` (locked: one writer), resuming its finished items; `load()` gives (model, tokenizer).
    Writes <kind>.json, <kind>.md and <kind>.png there and returns the markdown table."""
    kind = obs.kind
    with RunLock(folder):
        ckpt = Checkpoint(folder / "items.jsonl")
        if ckpt.items:
            on_resume(len(ckpt.items))
        model, tok = load()
        n = obs.samples or (1 if kind == "similarity" else 4)
        prompts = analysis_prompts(tok, obs.task, obs.length, n, seed=obs.seed, data_dir=obs.data_dir)
        if kind == "similarity":
            from . import similarity

            offset_prompts = [
                p
                for length in obs.offset_lengths
                for p in analysis_prompts(tok, obs.task, length, 1, obs.seed, data_dir=obs.data_dir)
            ]
            result = similarity.run_similarity(
                model,
                tok,
                prompts,
                offset_prompts,
                n_tokens=obs.tokens,
                trials=obs.trials,
                points=obs.points,
                seed=obs.seed,
                progress=progress,
                done=ckpt.items,
                on_result=ckpt.save,
            )
            md = similarity.markdown(result)
            similarity.figure(result, str(folder / f"{kind}.png"))
        else:
            from . import recall

            result = recall.run_windows(
                model,
                tok,
                prompts,
                budget=obs.budget,
                windows=list(obs.windows),
                contents=list(obs.contents),
                answer_tokens=obs.answer_tokens,
                seed=obs.seed,
                progress=progress,
                done=ckpt.items,
                on_result=ckpt.save,
            )
            md = recall.markdown(result, kind)
            recall.figure(result, kind, str(folder / f"{kind}.png"))
        result["config"] = obs.config
        write_text(folder / f"{kind}.json", json.dumps(result, indent=1, default=str), "json")
        write_text(folder / f"{kind}.md", md, "markdown")
    return md
