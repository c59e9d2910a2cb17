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

Integrity. The record `dapq-gguf.json` lists every other file of the entry with its size and sha256. Every load
compares the sizes (one stat per file) and, the first time an entry is used in a process, the sha256 of every file
(memoized per entry by each file's inode, size, modification and change times, so a later write to any file is seen);
all of this happens before transformers reads the folder. A damaged entry (a size or hash that differs, a missing or
unlisted file, an unreadable record) is a one-line error naming the folder to delete; dapq leaves it as found, since
something other than dapq changed it (a disk fault, a tool, a person) and that is worth knowing. An entry with no
per-file hashes (written by an earlier version, or with its record gone) cannot be verified, so it is converted
again, with a one-line notice. Measured on the bundled model's entry (542 MB, float32 safetensors; 2 CPU cores,
files in the page cache): the sha256 check takes about 0.4 s on first use (of a first load of about 3 s), the size
check about 0.3 ms.
A GGUF file is checked to be one (magic bytes `GGUF`, and the `gguf` package's reader parses its header, metadata and
tensor table) before "Converting ..." is printed and before transformers de-quantizes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DapqError

__all__ = [
    "DAMAGED",
    "ENTRY_RECORD",
    "MISSING",
    "OK",
    "RECORD_FORMAT",
    "UNVERIFIABLE",
    "cache_root",
    "cached_entry",
    "check_gguf",
    "convert",
    "entry_path",
    "entry_state",
    "file_sha256",
    "gguf_folder",
    "load_gguf_direct",
    "load_uncached",
    "sha256_files",
]

ENTRY_RECORD = "dapq-gguf.json"  # written last into an entry: what it was converted from, and its files' hashes
RECORD_FORMAT = 2  # 2: the record lists every file's size and sha256 ("files"); 1 (no "format"): it did not
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (the format's magic number)

#: entry_state() answers: no entry; an entry that cannot be verified (no record, or no per-file hashes: converted
#: again); one whose files differ from its record (an error naming the folder); an intact one
MISSING, UNVERIFIABLE, DAMAGED, OK = "missing", "unverifiable", "damaged", "ok"

_OFF = ("off", "none", "0", "false", "no")
_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime_ns, ctime_ns) per part -> sha256, for this process
_VERIFIED: set[tuple] = set()  # (entry, record text, (name, inode, size, mtime_ns, ctime_ns) per file): hashed


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


def sha256_files(paths: Sequence[Path]) -> str:
    """sha256 of the files' concatenation, read now (no memo): what the entry check and `file_sha256` call."""
    digest = hashlib.sha256()
    for block in _blocks(paths):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 of the files' concatenation (a GGUF split into parts hashes as the whole file); memoized per process by
    each part's path, inode, size, modification and change times (any write changes the change time, which no
    user-level call can set back)."""
    key = tuple(
        (str(Path(p).resolve()), (s := Path(p).stat()).st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for p in paths
    )
    if key not in _HASHES:
        _HASHES[key] = sha256_files(paths)
    return _HASHES[key]


def _blocks(paths: Sequence[Path]) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as f:
            yield from iter(lambda f=f: f.read(1 << 22), b"")


def entry_path(root: Path, sha256: str) -> Path:
    """Where the conversion of the file with this content lives (content-addressed: the same bytes under any name or
    path share one entry)."""
    return root / "models" / f"sha256-{sha256[:16]}"


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def entry_state(root: Path, sha256: str, deep: bool = True) -> tuple[str, str]:
    """(state, what is wrong) of the cache entry for this content: (MISSING, ""), (UNVERIFIABLE, why), (DAMAGED, what
    differs, e.g. "model.safetensors: sha256 differs") or (OK, "").

    Always checked (a stat per file): the record parses and is this content's, the folder holds exactly the files it
    lists (regular files, no links), at their recorded sizes. With `deep`, each file's sha256 too, the first time this
    entry is seen in this process with these files (memoized by entry, record text and every file's inode, size,
    modification and change times: any later write to a file changes its change time and brings a new check)."""
    entry = entry_path(root, sha256)
    try:
        st = os.lstat(entry)
    except (FileNotFoundError, NotADirectoryError):
        return MISSING, ""
    except OSError as exc:
        return DAMAGED, f"it cannot be read: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return DAMAGED, "it is a symbolic link, not a folder"
    if not stat.S_ISDIR(st.st_mode):
        return DAMAGED, "it is not a folder"
    try:
        names = {}
        for child in os.scandir(entry):
            names[child.name] = child.stat(follow_symlinks=False)
    except OSError as exc:
        return DAMAGED, f"it cannot be listed: {exc.strerror}"
    if ENTRY_RECORD not in names:
        return UNVERIFIABLE, f"it has no record {ENTRY_RECORD} (an interrupted conversion)"
    if not stat.S_ISREG(names[ENTRY_RECORD].st_mode):
        return DAMAGED, f"{ENTRY_RECORD}: not a regular file"
    try:
        text = (entry / ENTRY_RECORD).read_text(encoding="utf-8")
        record = json.loads(text)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return DAMAGED, f"{ENTRY_RECORD}: unreadable ({type(exc).__name__})"
    if not isinstance(record, dict) or record.get("sha256") != sha256:
        return DAMAGED, f"{ENTRY_RECORD}: not the record of this GGUF file"
    files = record.get("files")
    if files is None:
        return UNVERIFIABLE, "it was written by an earlier dapq, without per-file hashes"
    if not isinstance(files, dict) or not all(
        isinstance(name, str)
        and name not in ("", ".", "..", ENTRY_RECORD)
        and "/" not in name
        and isinstance(info, dict)
        and isinstance(info.get("size"), int)
        and _is_hex64(info.get("sha256"))
        for name, info in files.items()
    ):
        return DAMAGED, f"{ENTRY_RECORD}: its file list is malformed"
    for name, st in sorted(names.items()):
        if name == ENTRY_RECORD:
            continue
        if name not in files:
            return DAMAGED, f"{name}: not in the record"
        if not stat.S_ISREG(st.st_mode):
            return DAMAGED, f"{name}: not a regular file"
    for name, info in sorted(files.items()):
        if name not in names:
            return DAMAGED, f"{name}: missing"
        if names[name].st_size != info["size"]:
            return DAMAGED, f"{name}: {names[name].st_size} bytes, recorded {info['size']}"
    if not deep:
        return OK, ""
    key = (str(entry.resolve()), text, tuple((name, *_stat_key(names[name])) for name in sorted(files)))
    if key in _VERIFIED:
        return OK, ""
    for name, info in sorted(files.items()):
        if sha256_files([entry / name]) != info["sha256"]:
            return DAMAGED, f"{name}: sha256 differs"
    _VERIFIED.add(key)
    return OK, ""


def cached_entry(root: Path, sha256: str) -> Path | None:
    """The cache entry for this content if it is complete and its files have their recorded sizes (no hashing: see
    `entry_state`), else None."""
    return entry_path(root, sha256) if entry_state(root, sha256, deep=False)[0] == OK else None


def _hash_folder(folder: Path) -> tuple[dict[str, dict[str, Any]], tuple]:
    """({name: {"size", "sha256"}} of every file in `folder`, each file's (name, inode, size, mtime_ns, ctime_ns) as
    stat gave it before hashing: unchanged afterwards means the hash is of what the file holds)."""
    files: dict[str, dict[str, Any]] = {}
    stats = []
    for path in sorted(folder.iterdir()):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DapqError(f"{path}: the conversion wrote something that is not a regular file; report this.")
        files[path.name] = {"size": st.st_size, "sha256": sha256_files([path])}
        stats.append((path.name, *_stat_key(st)))
    return files, tuple(stats)


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


def check_gguf(path: Path, name: str | None = None) -> None:
    """A one-line DapqError unless `path` is a GGUF model file: it starts with the magic bytes `GGUF`, the `gguf`
    package's reader (the one transformers uses) parses its header, metadata and tensor table, and it holds tensors
    and names an architecture. Checked before the slow de-quantization, so an empty, truncated, header-only or
    non-GGUF file is refused at once, with nothing converted (and no "Converting ..." announced)."""
    what = name or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except IsADirectoryError:
        raise DapqError(f"{what} is a folder, not a GGUF file: pass the path of a .gguf file.") from None
    except OSError as exc:
        raise DapqError(f"{what} cannot be read ({exc.strerror}): pass a readable .gguf file.") from None
    if not head:
        raise DapqError(f"{what} is empty, not a GGUF file: download it again or pass another .gguf file.")
    if head != GGUF_MAGIC:
        raise DapqError(
            f"{what} is not a GGUF file (it does not start with the bytes GGUF): pass a .gguf model file, or a model "
            "folder without the .gguf suffix."
        )
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise DapqError(f"Loading a GGUF file needs extra packages ({exc}). Run: pip install gguf accelerate") from exc
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader's own errors on a cut file: struct.error, IndexError, ValueError, ...
        raise DapqError(
            f"{what} is not a readable GGUF file ({type(exc).__name__}: {exc}): it is truncated or damaged; download "
            "it again."
        ) from None
    if not reader.tensors or "general.architecture" not in reader.fields:
        raise DapqError(
            f"{what} is a GGUF file without a model (no tensors or no general.architecture): pass a GGUF model file."
        )


def load_gguf_direct(
    path: Path, dtype: Any = None, *, announce: str | None = None, **load_kwargs: Any
) -> tuple[Any, Any]:
    """(model, tokenizer) de-quantized from one GGUF file by transformers (slow; no cache). The file is checked first
    (`check_gguf`); `announce` (the conversion's notice) is printed to stderr only once the file passed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    if announce:
        print(announce, file=sys.stderr, flush=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # one progress line per tensor group otherwise
    try:  # GGUF de-quantization prints an unconditional tqdm bar to stderr: keep it out of our output
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype or torch.float32, **load_kwargs
            )
    except ImportError as exc:  # gguf / accelerate missing
        raise DapqError(f"Loading a GGUF file needs extra packages ({exc}). Run: pip install gguf accelerate") from exc
    except (ValueError, KeyError, OSError, struct.error) as exc:
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
    """Write the cache entry for these GGUF bytes (already hashed to `sha256`) and return it: the model as float32
    safetensors, its tokenizer, and last the record with every file's size and sha256. Replaces an entry that cannot
    be verified (no record, or an earlier version's record); keeps an intact one another process finished first."""
    from .safefile import ensure_dir, write_json

    models = ensure_dir(root / "models", "the GGUF cache folder (--cache-dir or DAPQ_CACHE_DIR)")
    entry = entry_path(root, sha256)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=models))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an entry is as readable as any other cache file
    start = time.perf_counter()
    announce = f"Converting {name} to a safetensors cache in {entry} (once; later loads take seconds) ..."
    try:
        with _single_file(sources, tmp / "assemble", sha256) as gguf:
            model, tokenizer = load_gguf_direct(gguf, announce=announce)
            # transformers de-quantized every tensor (no GGUF kernels on CPU) but still marks the model as GGUF-
            # quantized, which save_pretrained refuses: the weights are plain float32 tensors, saved as they are
            model.hf_quantizer = None
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            with contextlib.redirect_stderr(io.StringIO()):  # a "Writing model shards" bar
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "assemble", ignore_errors=True)
        files, hashed = _hash_folder(tmp)
        record = {
            "format": RECORD_FORMAT,
            "sha256": sha256,
            "size": sum(Path(p).stat().st_size for p in sources),
            "name": name,
            "sources": [str(Path(p).resolve()) for p in sources],
            "dtype": "float32",
            "versions": _versions(),
            "convert_s": round(time.perf_counter() - start, 1),
            "files": files,
        }
        write_json(tmp / ENTRY_RECORD, record)
        ours = _install(tmp, entry, root, sha256)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if ours:  # the files were hashed just now: the first load in this process need not hash them again
        with contextlib.suppress(OSError):
            now = tuple((n, *_stat_key(os.lstat(entry / n))) for n in sorted(files))
            if now == hashed:
                _VERIFIED.add((str(entry.resolve()), (entry / ENTRY_RECORD).read_text(encoding="utf-8"), now))
    return entry


def _install(tmp: Path, entry: Path, root: Path, sha256: str) -> bool:
    """Rename the finished `tmp` to `entry`; True if it is ours. An intact entry already there (another process
    finished first) is kept (False); one that cannot be verified is moved aside and removed."""
    try:
        tmp.rename(entry)
        return True
    except OSError:
        pass
    if entry_state(root, sha256, deep=False)[0] == OK:
        return False
    trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old.", dir=entry.parent))
    try:
        with contextlib.suppress(FileNotFoundError):
            entry.rename(trash / "entry")
        try:
            tmp.rename(entry)
        except OSError as exc:  # yet another process put one there meanwhile
            if entry_state(root, sha256, deep=False)[0] == OK:
                return False
            raise DapqError(f"{entry} cannot be written ({exc.strerror}): delete that folder and rerun.") from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return True


def gguf_folder(sources: Sequence[Path], name: str, root: Path, sha256: str | None = None) -> Path:
    """The cache entry (a transformers model folder) for the GGUF file made of `sources`, converting it on first use.
    With `sha256`, the content must hash to it (a mismatch is refused before anything is converted or loaded).
    The entry is verified (`entry_state`, hashing its files on first use in this process) before it is returned:
    a damaged one is a one-line DapqError naming the folder to delete; one that cannot be verified is converted
    again."""
    digest = file_sha256(sources)
    if sha256 is not None and digest != sha256:
        raise DapqError(
            f"{name}: the file's sha256 is {digest}, expected {sha256}. The installed packages are not the expected "
            "file: reinstall them (see `dapq models`)."
        )
    entry = entry_path(root, digest)
    state, problem = entry_state(root, digest, deep=True)
    if state == OK:
        return entry
    from .safefile import FileLock, ensure_dir

    # one conversion at a time: processes started together (several builders on one GPU) wait for the first
    models = ensure_dir(root / "models", "the GGUF cache folder (--cache-dir or DAPQ_CACHE_DIR)")
    lock = FileLock(models / f".{entry.name}.converting", remove=True)
    if not lock.acquire():
        print(f"{name}: another process is converting it; waiting for it ...", file=sys.stderr, flush=True)
        lock.acquire(wait=True)
    try:
        state, problem = entry_state(root, digest, deep=True)  # the process we waited for may have written it
        if state == OK:
            return entry
        if state == DAMAGED:
            raise DapqError(
                f"{entry} is damaged ({problem}): delete that folder and rerun; it is rebuilt from the GGUF file."
            )
        if state == UNVERIFIABLE:
            print(f"{entry}: {problem}, so it cannot be verified: converting {name} again.", file=sys.stderr)
        return convert(sources, root, name, digest)
    finally:
        lock.release()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "gguf", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
