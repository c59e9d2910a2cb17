"""Learned pseudo queries: DapQ's mechanism with trained content (related work: Judge Q, arXiv 2509.10798, trained
soft-token queries; LookaheadKV, arXiv 2603.10899, learned lookahead tokens).

N input embeddings (a tensor [N, hidden], trained by `dapq train-queries` with the model frozen, `dapq.train`) are
appended after the prompt during prefill at the positions L .. L+N-1 the first N generated tokens will occupy,
exactly where DapQ puts its pseudo tokens (`EmbeddedSuffix`: the engine embeds the prompt with the model's own
embedding table and puts these vectors at the suffix). Their queries score every prompt key with the softmax
attention of the prefill forward (summed over the N queries, as DapQ's Eq. 4), the scores are max-pooled along the
key axis (kernel 7) and reduced over the GQA group, the top-B prompt tokens per head are kept and the N pseudo
entries are dropped: one prefill, DapQ's memory peak.

`queries`: a file written by `dapq train-queries` (a dict with `embeddings` [N, hidden] float32 and what they were
trained for), a shipped model name (`shipped_names()`), or None: the queries shipped in the package for the model
the method runs on (`model_defaults`, applied by the engine and the harness once the model is known: the bundled
SmolLM2-135M-Instruct's `learned_queries/smollm2-135m-instruct.pt`, trained as docs/results/front.md says, and
Qwen2.5-Coder-0.5B-Instruct's, as docs/results/learned-generic.md says); a model without shipped queries is refused.

A queries file records the model it was trained for: `model` (a name) and `model_fingerprint`
(`config_fingerprint`: a hash of the architecture fields of the model's config, i.e. the family, sizes, heads,
vocabulary and RoPE, so the GGUF and the hub release of one model match, while another model of the same hidden size
does not). A file of another model is refused with a one-line error; `allow_other_model=True` uses it anyway, with a
warning. Files written before the fingerprint existed are checked by hidden size only.

Capacity step (optional, LookaheadKV, arXiv 2603.10899, Sec. 3): a file may also hold `adapters`, low-rank
adapters (rank r, per adapted linear layer A [r, in], B [out, r]) that act only at the N pseudo positions
(`dapq.hf.adapters`, applied by the engine). The prompt comes first, so its hidden states, keys, values and
first-token logits stay exactly the model's; only the learned tokens' own path through the layers changes.

Shapes: the layer's queries [B, H_q, T+N, D] (the learned queries are the last N), keys [B, H_c, T+N, D]; scores
[B, H_q, T]; kept indices [B, H_c, B_tokens] into the prompt [0, T).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DapqError
from ..lazy import torch
from ..safefile import save_torch
from .base import KeepsRecent, LayerInputs, ScorerMethod, positive_int, register
from .protocols import EmbeddedSuffix
from .scoring import suffix_scores

FORMAT = "dapq-learned-queries"
#: the config fields that identify a model's architecture for learned queries (what their attention depends on)
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
    "max_position_embeddings",
)


def config_fingerprint(config: Any) -> str:
    """A short hash of the architecture fields (`FINGERPRINT_FIELDS`) of a transformers config."""
    import json

    fields = {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_config(config: Any) -> str:
    """One line naming a config's architecture, for error messages."""
    return (
        f"{getattr(config, 'model_type', '?')}, hidden {getattr(config, 'hidden_size', '?')}, "
        f"{getattr(config, 'num_hidden_layers', '?')} layers, vocabulary {getattr(config, 'vocab_size', '?')}"
    )


SHIPPED_DIR = Path(__file__).parent / "learned_queries"
SHIPPED = SHIPPED_DIR / "smollm2-135m-instruct.pt"


def shipped_names() -> list[str]:
    """The models dapq ships learned queries for (`queries=<name>` selects one)."""
    return sorted(f.stem for f in SHIPPED_DIR.glob("*.pt"))


def shipped_for(model_config: Any) -> str | None:
    """The name of the shipped queries trained for this model's architecture, if any."""
    files = [SHIPPED_DIR / f"{name}.pt" for name in shipped_names()]
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _shipped_by_fingerprint(str(SHIPPED_DIR), stamp).get(config_fingerprint(model_config))


@functools.lru_cache(maxsize=4)
def _shipped_by_fingerprint(folder: str, stamp: tuple) -> dict[str, str]:
    """{model fingerprint: shipped queries name} of the files in `folder` (read again when `stamp`, their names,
    sizes and times, changes): every engine call asks, and loading each file each time would cost."""
    found: dict[str, str] = {}
    for name, _, _ in stamp:
        try:
            fingerprint = load_queries(Path(folder) / name).get("model_fingerprint")
        except DapqError:
            continue
        if fingerprint:
            found.setdefault(str(fingerprint), Path(name).stem)
    return found


def load_queries(path: str | Path) -> dict[str, Any]:
    """A learned-queries file as a dict (`embeddings` [N, hidden] float32, `hidden_size`, `model`, `training`, and
    `sha256`: the file's content hash, read from the same bytes that were loaded). Loaded with weights_only=True:
    a file can hold tensors and plain values only, never code."""
    p = Path(path)
    if p.is_dir():
        raise DapqError(f"queries={p} is a folder: pass a queries file inside it (written by dapq train-queries).")
    if not p.is_file():
        raise DapqError(f"No learned-queries file at {p}: train one with `dapq train-queries --out {p}`.")
    try:
        raw = p.read_bytes()
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) files: the error below says it all
            warnings.simplefilter("ignore")
            data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file, or a pickle that would run code (refused, never run)
        raise DapqError(
            f"{p} is not a learned-queries file ({type(exc).__name__}): write it with dapq train-queries."
        ) from exc
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("embeddings"), torch.Tensor)
    ):
        raise DapqError(f"{p} is not a learned-queries file (no '{FORMAT}' format tag): write it with train-queries.")
    emb = data["embeddings"]
    if emb.dim() != 2 or emb.shape[0] < 1 or not torch.isfinite(emb).all():
        raise DapqError(f"{p}: embeddings must be a finite [N, hidden] tensor; got shape {tuple(emb.shape)}.")
    if data.get("adapters") is not None:
        check_adapters(data["adapters"], str(p))
    data["sha256"] = hashlib.sha256(raw).hexdigest()
    return data


#: the projections adapters may wrap (the names `dapq.hf.adapters` hooks)
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_adapters(data: Any, where: str) -> dict[str, Any]:
    """A file's `adapters` entry checked before any model loads: rank >= 1, a scale, known module kinds, and per
    layer a finite A [r, in] and B [out, r]; anything else is a one-line error naming `where`."""
    try:
        rank, _ = int(data["rank"]), float(data["scale"])
        modules = [str(m) for m in data["modules"]]
        a, b = dict(data["a"]), dict(data["b"])
        ok = (
            rank >= 1
            and bool(a)
            and set(a) == set(b)
            and bool(modules)
            and all(m in ADAPTABLE for m in modules)
            and all(name.rsplit(".", 1)[-1] in modules for name in a)
            and all(
                isinstance(a[k], torch.Tensor)
                and isinstance(b[k], torch.Tensor)
                and a[k].dim() == 2
                and b[k].dim() == 2
                and a[k].shape[0] == rank
                and b[k].shape[1] == rank
                and bool(torch.isfinite(a[k]).all() and torch.isfinite(b[k]).all())
                for k in a
            )
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DapqError(
            f"{where}: its adapters are malformed (they need a rank, a scale, module kinds and a finite A [r, in] and "
            "B [out, r] per layer): retrain them with dapq train-queries --lora-rank R."
        )
    return data


def save_queries(path: str | Path, embeddings: torch.Tensor, **meta: Any) -> Path:
    """Write a learned-queries file (`embeddings` [N, hidden]; `meta`: model, hidden_size, training settings: plain
    JSON-like values) through the safe-write path (`dapq.safefile`: never through a link, never over a file that is
    not a torch file)."""
    data = {"format": FORMAT, **meta, "embeddings": embeddings.detach().float().cpu().contiguous()}
    data.setdefault("hidden_size", int(embeddings.shape[1]))
    return save_torch(path, data, kind="torch")


@register("learned")
@dataclass
class LearnedQueries(KeepsRecent, ScorerMethod, EmbeddedSuffix):
    """Learned pseudo queries. Fields: `queries` (a file from `dapq train-queries`; None: the queries dapq ships for
        the model it runs on, the bundled model's until a model is known; a shipped model name such as
        "qwen2.5-coder-0.5b-instruct": the queries shipped for it),
        `include_pseudo_keys` (True: the softmax includes the learned queries' own keys, as the prefill computes it and
        as they were trained), `keep_recent` (0), `pooling`/`kernel` (max, 7), plus budget, layout, gqa, and
        `allow_other_model` (False: a file trained for another model is an error; True: used with a warning). N is the
        file's number of embeddings. `queries_sha256` (set from the file, not a parameter): the file's content hash,
        part of the fields every results row and resume key carry, so retraining into the same
    path never mixes rows of two files under one method key."""

    queries: str | None = None
    include_pseudo_keys: bool = True
    keep_recent: int = 0
    allow_other_model: bool = False
    queries_sha256: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.queries, os.PathLike):  # a Path is a file name too
            self.queries = os.fspath(self.queries)
        if isinstance(self.queries, str) and not self.queries.strip():
            raise DapqError("queries= is empty: pass a file written by dapq train-queries, or leave it unset.")
        super().__post_init__()
        positive_int("keep_recent", self.keep_recent, minimum=0)
        if self.queries is None and not SHIPPED.is_file():
            raise DapqError(
                f"The shipped learned queries are missing ({SHIPPED}): reinstall dapq or pass queries=FILE."
            )
        self._data: dict[str, Any] | None = None
        self._warned = False
        self._key: str | None = None
        self.queries_sha256 = self.data()["sha256"]  # a missing or foreign file fails here, before any model load

    @classmethod
    def model_defaults(cls, params: dict[str, Any], model_config: Any) -> dict[str, Any]:
        """Without `queries`, the queries dapq ships for this model (`shipped_for`), so `learned` needs no argument
        on every model dapq ships queries for; {} for the bundled model (its file is the default) and for a model
        without shipped queries (the default file then refuses it with a one-line error)."""
        if params.get("queries") is not None:
            return {}
        name = shipped_for(model_config)
        if name is None or SHIPPED_DIR / f"{name}.pt" == SHIPPED:
            return {}
        return {"queries": name}

    @property
    def path(self) -> Path:
        """None: the bundled model's shipped file; a shipped model name (`shipped_names()`): its file; else a path."""
        if self.queries is None:
            return SHIPPED
        if self.queries in shipped_names() and not Path(self.queries).exists():
            return SHIPPED_DIR / f"{self.queries}.pt"
        return Path(self.queries)

    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = load_queries(self.path)
        return self._data

    @property
    def n_pseudo(self) -> int:
        return int(self.data()["embeddings"].shape[0])

    def pseudo_positions(self, prompt_len: int) -> list[int]:
        return list(range(prompt_len, prompt_len + self.n_pseudo))

    def suffix_embeddings(self, model_config: Any) -> torch.Tensor:  # [N, hidden]
        data = self.data()
        emb = data["embeddings"]
        hidden_size = int(model_config.hidden_size)
        trained_for = data.get("model_fingerprint")
        if trained_for and trained_for != config_fingerprint(model_config):
            what = (
                f"The learned queries in {self.path} were trained for {data.get('model', 'another model')} "
                f"({data.get('model_config', 'fingerprint ' + str(trained_for))}); this model is "
                f"{describe_config(model_config)}"
            )
            if not self.allow_other_model:
                ships = shipped_for(model_config)
                hint = (
                    f"dapq ships queries for it: pass queries={ships} (--param learned.queries={ships})"
                    if ships
                    else "train queries for it with `dapq train-queries --model ...`"
                )
                raise DapqError(
                    f"{what}: {hint}, or pass allow_other_model=True (--param learned.allow_other_model=true) to "
                    "use them anyway."
                )
            if not self._warned:
                warnings.warn(f"{what}: used anyway (allow_other_model=True).", stacklevel=2)
                self._warned = True
        if emb.shape[1] != hidden_size:
            raise DapqError(
                f"The learned queries in {self.path} were trained for hidden size {emb.shape[1]} "
                f"({data.get('model', 'unknown model')}); this model has {hidden_size}: train queries for it with "
                "`dapq train-queries --model ...`."
            )
        return emb

    def file_hashes(self) -> dict[str, str]:
        return {"queries": self.queries_sha256}

    def suffix_adapters(self) -> dict[str, Any] | None:
        return self.data().get("adapters")

    def embedding_key(self) -> str:  # hashed once: score_key asks for it at every layer
        if self._key is None:
            h = hashlib.sha256(self.data()["embeddings"].float().numpy().tobytes())
            adapters = self.suffix_adapters()
            if adapters:  # the suffix's content is the embeddings and the adapters on its path
                h.update(repr((adapters["rank"], adapters["scale"], list(adapters["modules"]))).encode())
                for name in sorted(adapters["a"]):
                    h.update(name.encode())
                    h.update(adapters["a"][name].float().numpy().tobytes())
                    h.update(adapters["b"][name].float().numpy().tobytes())
            self._key = h.hexdigest()[:16]
        return self._key

    def score_key(self) -> tuple:  # the scores depend on the file's content, not only its name
        return super().score_key() + (self.embedding_key(),)

    def query_head_scores(self, inp: LayerInputs) -> torch.Tensor:  # [B, H_q, T]
        return suffix_scores(inp, self.include_pseudo_keys)
