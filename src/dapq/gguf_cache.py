"""GGUF files as transformers models, through a conversion cache.

transformers reads GGUF files by de-quantizing every tensor (about a minute for the bundled 135M model on 2 cores).
The first load of a GGUF file writes the de-quantized model as safetensors (float32, exactly the tensors the GGUF load
produced), its tokenizer, and a record of the file's sha256 into a cache entry; later loads read that folder, which
takes seconds. Entries are keyed by the content hash (`<root>/models/sha256-<16 hex>`), so a changed file is never
served stale: it gets its own entry, and the same bytes under another name or path share one.
An entry is written to a temporary folder and renamed into place when complete, so an interrupted conversion leaves
nothing a later load would trust, and two processes converting the same file at once both end with one good entry.

Where: `$DAPQ_CACHE_DIR`, else `$XDG_CACHE_HOME/dapq`, else `~/.cache/dapq`; entries live under `<root>/models/`.
`load_model(..., cache_dir=...)` and `--cache-dir` override it; `cache_dir=False` (or DAPQ_CACHE_DIR=off) loads the
GGUF directly every time and writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DapqError

__all__ = [
    "ENTRY_RECORD",
    "cache_root",
    "cached_entry",
    "convert",
    "entry_path",
    "file_sha256",
    "gguf_folder",
    "load_gguf_direct",
    "load_uncached",
]

ENTRY_RECORD = "dapq-gguf.json"  # written last into an entry: what it was converted from
_OFF = ("off", "none", "0", "false", "no")
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) per part -> sha256, for this process


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cache root: `cache_dir`, else $DAPQ_CACHE_DIR, else $XDG_CACHE_HOME/dapq, else ~/.cache/dapq. None when
    caching is off (DAPQ_CACHE_DIR=off)."""
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    elif os.environ.get("DAPQ_CACHE_DIR"):
        if os.environ["DAPQ_CACHE_DIR"].strip().lower() in _OFF:
            return None
        root = Path(os.environ["DAPQ_CACHE_DIR"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base).expanduser() / "dapq"
    if root.exists() and not root.is_dir():
        raise DapqError(
            f"The cache folder {root} is an existing file: pass a folder with --cache-dir or DAPQ_CACHE_DIR."
        )
    return root


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 of the files' concatenation (a GGUF split into parts hashes as the whole file); memoized per process by
    each part's path, inode, size, modification and change times (any write changes the change time, which no
    user-level call can set back)."""
    key = tuple(
        (str(Path(p).resolve()), (s := Path(p).stat()).st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for p in paths
    )
    if key not in _HASHES:
        digest = hashlib.sha256()
        for block in _blocks(paths):
            digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _blocks(paths: Sequence[Path]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as f:
            yield from iter(lambda f=f: f.read(1 << 22), b"")


def entry_path(root: Path, sha256: str) -> Path:
    """Where the conversion of the file with this content lives (content-addressed: the same bytes under any name or
    path share one entry)."""
    return root / "models" / f"sha256-{sha256[:16]}"


def cached_entry(root: Path, sha256: str) -> Path | None:
    """The complete cache entry for this content, or None."""
    entry = entry_path(root, sha256)
    record = entry / ENTRY_RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if data.get("sha256") == sha256 else None


@contextlib.contextmanager
def _single_file(sources: Sequence[Path], work: Path, sha256: str | None = None) -> Iterator[Path]:
    """A path to the whole GGUF file: the file itself, or the parts concatenated into `work` (checked against
    `sha256` while writing, deleted afterwards)."""
    if len(sources) == 1:
        yield Path(sources[0])
        return
    work.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=".gguf", dir=work)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for block in _blocks(sources):
                digest.update(block)
                out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DapqError(f"The assembled GGUF file's sha256 is {digest.hexdigest()}, expected {sha256}.")
        yield path
    finally:
        path.unlink(missing_ok=True)


def load_gguf_direct(path: Path, dtype: Any = None, **load_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) de-quantized from one GGUF file by transformers (slow; no cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)  # one progress line per tensor group otherwise
    try:  # GGUF de-quantization prints an unconditional tqdm bar to stderr: keep it out of our output
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype or torch.float32, **load_kwargs
            )
    except ImportError as exc:  # gguf / accelerate missing
        raise DapqError(f"Loading a GGUF file needs extra packages ({exc}). Run: pip install gguf accelerate") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise DapqError(f"transformers cannot read {path} as a GGUF model: {exc}") from exc
    return model, tokenizer


def load_uncached(sources: Sequence[Path], sha256: str | None = None, **load_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) straight from the GGUF parts, writing no cache (parts are concatenated into a temporary
    file, checked against `sha256`, and deleted)."""
    with tempfile.TemporaryDirectory(prefix="dapq-gguf-") as work:
        if len(sources) == 1 and sha256 is not None and file_sha256(sources) != sha256:
            raise DapqError(f"{sources[0]}: the file's sha256 is {file_sha256(sources)}, expected {sha256}.")
        with _single_file(sources, Path(work), sha256) as gguf:
            return load_gguf_direct(gguf, **load_kwargs)


def convert(sources: Sequence[Path], root: Path, name: str, sha256: str) -> Path:
    """Write the cache entry for these GGUF bytes (already hashed to `sha256`) and return it."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    entry = entry_path(root, sha256)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=models))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an entry is as readable as any other cache file
    start = time.perf_counter()
    print(f"Converting {name} to a safetensors cache in {entry} (once; later loads take seconds) ...", file=sys.stderr)
    try:
        with _single_file(sources, tmp / "assemble", sha256) as gguf:
            model, tokenizer = load_gguf_direct(gguf)
            # transformers de-quantized every tensor (no GGUF kernels on CPU) but still marks the model as GGUF-
            # quantized, which save_pretrained refuses: the weights are plain float32 tensors, saved as they are
            model.hf_quantizer = None
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            with contextlib.redirect_stderr(io.StringIO()):  # a "Writing model shards" bar
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "assemble", ignore_errors=True)
        record = {
            "sha256": sha256,
            "size": sum(Path(p).stat().st_size for p in sources),
            "name": name,
            "sources": [str(Path(p).resolve()) for p in sources],
            "dtype": "float32",
            "versions": _versions(),
            "convert_s": round(time.perf_counter() - start, 1),
        }
        (tmp / ENTRY_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        try:
            tmp.rename(entry)
        except OSError:  # another process finished first (or a stale incomplete entry): keep a complete one
            if cached_entry(root, sha256) is None:
                shutil.rmtree(entry, ignore_errors=True)
                tmp.rename(entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def gguf_folder(sources: Sequence[Path], name: str, root: Path, sha256: str | None = None) -> Path:
    """The cache entry (a transformers model folder) for the GGUF file made of `sources`, converting it on first use.
    With `sha256`, the content must hash to it (a mismatch is refused before anything is converted or loaded)."""
    digest = file_sha256(sources)
    if sha256 is not None and digest != sha256:
        raise DapqError(
            f"{name}: the file's sha256 is {digest}, expected {sha256}. The installed packages are not the expected "
            "file: reinstall them (see `dapq models`)."
        )
    return cached_entry(root, digest) or convert(sources, root, name, digest)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "gguf", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
