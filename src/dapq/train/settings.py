"""What a training run of learned pseudo queries depends on (`dapq train-queries`); a checkpoint resumes only with
equal settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import finite
from ..errors import DapqError
from ..methods.learned import ADAPTABLE
from .corpus import KINDS
from .generic import DEFAULT_TEXTS, GENERIC_KINDS, check_texts

LOSSES = ("kl", "gold")
RECIPES = ("generic", "needles")
TARGETS = ("mean", "copy", "recon")
EPS = 1e-9


@dataclass
class TrainSettings:
    """What a training run depends on (a checkpoint resumes only with equal settings)."""

    n_queries: int = 32
    n_train: int = 60
    n_val: int = 15
    lengths: tuple[int, int] = (512, 2048)
    kinds: tuple[str, ...] = ()  # () = every kind of the recipe
    answer_tokens: int = 24
    epochs: int = 8
    lr: float = 0.01
    batch: int = 4
    loss: str = "kl"
    budget: int = 128
    init_text: str = "Answer the question using the text above. The answer is:"
    seed: int = 0
    recipe: str = "generic"  # dapq.train.generic (task-agnostic, the default) or "needles" (dapq.train.corpus)
    texts: tuple[str, ...] = DEFAULT_TEXTS  # the generic recipe's text sources (dapq.train.generic.TEXTS)
    target: str = "mean"  # the answer's mean attention; "copy": only its steps that continue a run of the prompt;
    # "recon": KVzip's reconstruction importance (no answer at all)
    lora_rank: int = 0  # 0: the embeddings alone; r >= 1: plus rank-r adapters at the pseudo positions only
    lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_alpha: float = 16.0  # adapter scale = alpha / rank
    lora_lr: float = 0.002

    def __post_init__(self) -> None:
        for name in ("n_queries", "n_train", "n_val", "answer_tokens", "epochs", "batch", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                option = {"n_train": "--train", "n_val": "--val"}.get(name, f"--{name.replace('_', '-')}")
                raise DapqError(f"{option} must be an integer >= 1; got {value!r}")
        if self.recipe not in RECIPES:
            raise DapqError(f"--recipe must be one of {', '.join(RECIPES)}; got {self.recipe!r}")
        if self.target not in TARGETS:
            raise DapqError(f"--target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.loss not in LOSSES:
            raise DapqError(f"--loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        self.lr = finite("--lr", self.lr, low=0, low_open=True, high=10.0)
        self.lora_lr = finite("--lora-lr", self.lora_lr, low=0, low_open=True, high=10.0)
        self.lora_alpha = finite("--lora-alpha", self.lora_alpha, low=0, low_open=True, high=1e4)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise DapqError(f"--lora-rank must be an integer >= 0 (0: no adapters); got {self.lora_rank!r}")
        self.lora_modules = tuple(self.lora_modules)
        unknown = [m for m in self.lora_modules if m not in ADAPTABLE]
        if unknown or not self.lora_modules:
            raise DapqError(f"--lora-modules must be some of {','.join(ADAPTABLE)}; got {','.join(unknown) or 'none'}")
        self.lengths = tuple(self.lengths)  # type: ignore[assignment]
        self.texts = check_texts(self.texts)
        if self.recipe != "generic" and self.texts != DEFAULT_TEXTS:
            raise DapqError("--text chooses the generic recipe's text; the needle recipe has its own: drop --text")
        self.kinds = tuple(self.kinds) or (GENERIC_KINDS if self.recipe == "generic" else KINDS)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
