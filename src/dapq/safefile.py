"""The one path by which dapq writes files: results, reports, figures, queries, checkpoints, cache records, merges.

    from dapq.safefile import write_text, write_json, save_torch, save_figure, open_append, FileLock
    write_json(out / "run.json", {"settings": ...}, kind="json")
    save_torch(out, {"format": ..., "embeddings": emb}, kind="torch")

Every write goes to a temporary file created exclusively (`tempfile.mkstemp`: an unpredictable name, O_EXCL, mode
0600 then the usual 0644) in the target's own folder, is flushed and fsynced, then renamed over the target (rename
replaces a link, never follows it); an interrupted write leaves the old file or none, never half of one.
Before anything is written the target is checked:
- a symbolic link (dangling or not) is refused: dapq never writes through a link;
- an existing folder, device or other non-regular file is refused;
- an existing non-empty regular file must be of the kind being written (`KINDS`: a queries file is replaced by a
  queries file, never `notes.txt` or a PNG); anything else is refused rather than overwritten.
Folders are made with `ensure_dir`, which turns "a parent is a file", "read-only" and "/proc" into one-line errors
and proves the folder writable with a probe file, so a bad `--out` fails before a model is loaded.
Appends (results rows) open with O_NOFOLLOW; long writers hold a `FileLock` (flock) so a second process writing
the same output is refused instead of silently losing one result.
Every error is a one-line `DapqError` that says what to do.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import DapqError

__all__ = [
    "KINDS",
    "FileLock",
    "check_target",
    "ensure_dir",
    "open_append",
    "save_figure",
    "save_torch",
    "truncate",
    "write_bytes",
    "write_json",
    "write_text",
]

_HEAD = 512  # bytes read to recognise an existing file's kind


def _is_zip(head: bytes, path: Path) -> bool:  # torch.save writes a zip archive
    return head.startswith(b"PK\x03\x04")


def _is_png(head: bytes, path: Path) -> bool:
    return head.startswith(b"\x89PNG\r\n\x1a\n")


def _is_gzip(head: bytes, path: Path) -> bool:
    return head.startswith(b"\x1f\x8b")


def _is_json(head: bytes, path: Path) -> bool:
    return head.lstrip()[:1] in (b"{", b"[")


def _is_jsonl(head: bytes, path: Path) -> bool:  # results rows: one JSON object a line, or gzipped
    return head.lstrip()[:1] == b"{" or _is_gzip(head, path)


def _is_markdown(head: bytes, path: Path) -> bool:  # a report we wrote: a .md file of text
    return path.suffix.lower() == ".md" and b"\x00" not in head


#: kind -> a test on an existing file's first bytes (and name): may it be replaced by a file of this kind?
KINDS: dict[str, Callable[[bytes, Path], bool]] = {
    "torch": _is_zip,  # learned queries, training checkpoints
    "png": _is_png,
    "json": _is_json,
    "jsonl": _is_jsonl,
    "gzip": _is_gzip,
    "markdown": _is_markdown,
}
_KIND_WORDS = {
    "torch": "a torch file (queries or checkpoint)",
    "png": "a PNG image",
    "json": "a JSON file",
    "jsonl": "a results file (JSON lines)",
    "gzip": "a gzipped file",
    "markdown": "a markdown report (.md)",
}


def check_target(path: str | os.PathLike, kind: str) -> Path:
    """`path` as a Path if a file of `kind` may be written there, else a one-line DapqError: a link, a folder or
    another non-regular file, or an existing non-empty file that is not of this kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown file kind {kind!r}; one of {', '.join(KINDS)}")
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except NotADirectoryError:
        raise DapqError(f"{p}: a part of the path above it is a file, not a folder: pass another path.") from None
    except OSError as exc:
        raise DapqError(f"{p} cannot be checked ({exc.strerror}): pass another path.") from None
    if stat.S_ISLNK(st.st_mode):
        raise DapqError(f"{p} is a symbolic link: dapq never writes through links; remove it or pass another path.")
    if stat.S_ISDIR(st.st_mode):
        raise DapqError(f"{p} is a folder: pass a file name inside it.")
    if not stat.S_ISREG(st.st_mode):
        raise DapqError(f"{p} is not a regular file: pass another path.")
    if st.st_size > 0:
        try:
            with open(p, "rb") as f:
                head = f.read(_HEAD)
        except OSError as exc:
            raise DapqError(f"{p} exists and cannot be read ({exc.strerror}): pass another path.") from None
        if not KINDS[kind](head, p):
            raise DapqError(
                f"{p} exists and is not {_KIND_WORDS[kind]}: dapq will not overwrite it; pass another path or delete "
                "it."
            )
    return p


def ensure_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """The folder `path`, created with its parents and proven writable (a probe file made and removed), else a
    one-line DapqError naming `what`."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise DapqError(f"{what} {p} is a dangling symbolic link: remove it or pass another folder.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DapqError(f"{what} {p} is an existing file: pass a folder.") from None
    except NotADirectoryError:
        raise DapqError(f"{what} {p}: a part of the path is a file, not a folder: pass another path.") from None
    except OSError as exc:
        raise DapqError(f"{what} {p} cannot be created ({exc.strerror}): pass a writable folder.") from None
    if not p.is_dir():
        raise DapqError(f"{what} {p} is not a folder: pass a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dapq-probe.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DapqError(f"{what} {p} is not writable ({exc.strerror}): pass a writable folder.") from None
    return p


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, kind: str, text: bool = False) -> Iterator[IO[Any]]:
    """A file object on a fresh exclusive temporary beside `path`; on a clean exit it is fsynced and renamed over
    `path` (checked before and again right before the rename); on an error it is removed."""
    p = check_target(path, kind)
    folder = ensure_dir(p.parent, "the folder of") if str(p.parent) not in ("", ".") else Path(".")
    fd, name = tempfile.mkstemp(prefix=f".{p.name[:60]}.", suffix=".tmp", dir=folder)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_target(p, kind)  # nothing planted meanwhile
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable (not possible on every platform)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(path: str | os.PathLike, data: bytes, kind: str) -> Path:
    """Write `data` to `path` (a file of `kind`) safely: checked target, exclusive temporary, fsync, rename."""
    with _replacing(path, kind) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, kind: str = "markdown") -> Path:
    """Write UTF-8 `text` to `path` as `write_bytes` does."""
    return write_bytes(path, text.encode("utf-8"), kind)


def write_json(path: str | os.PathLike, obj: Any, kind: str = "json", **dump: Any) -> Path:
    """`obj` as indented JSON (plus a newline); NaN and infinities are refused (they are not JSON)."""
    text = json.dumps(obj, indent=dump.pop("indent", 1), allow_nan=False, **dump) + "\n"
    return write_text(path, text, kind)


def save_torch(path: str | os.PathLike, obj: Any, kind: str = "torch", compress: bool = False) -> Path:
    """`torch.save(obj)` written safely (tensors, plain containers and numbers only: the loader uses
    weights_only=True); `compress`: gzipped (level 3, no time stamp), a file of kind "gzip"."""
    import gzip

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = gzip.compress(buf.getvalue(), compresslevel=3, mtime=0) if compress else buf.getvalue()
    return write_bytes(path, data, "gzip" if compress else kind)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG, written safely."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes(path, buf.getvalue(), "png")


def open_append(path: str | os.PathLike, kind: str = "jsonl") -> IO[str]:
    """`path` opened for appending text (created if missing), never through a link (O_NOFOLLOW), a regular file of
    `kind` only."""
    p = check_target(path, kind)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(p, flags, 0o644)
    except OSError as exc:
        raise DapqError(f"{p} cannot be opened for writing ({exc.strerror}): pass another folder.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DapqError(f"{p} is not a regular file: pass another folder.")
    return os.fdopen(fd, "a", encoding="utf-8")


def truncate(path: str | os.PathLike, size: int) -> None:
    """Cut a regular file to `size` bytes in place (a results file's torn last line), never through a link."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise DapqError(f"{path} cannot be repaired ({exc.strerror}): remove it if it is a link.") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DapqError(f"{path} is not a regular file.")
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLock:
    """An exclusive, non-blocking lock (flock on `path`, a lock file never followed through a link): a second
    process writing the same output is refused with a one-line error that names `what` and the holder.
    `remove=True` deletes the lock file on release (while still holding it), for claims of which many are taken."""

    def __init__(self, path: str | os.PathLike, what: str = "this output", *, remove: bool = False):
        self.path = Path(path)
        self.what = what
        self.remove = remove
        self._fd: int | None = None
        self._holder = "another process"  # who held it, when acquire() found it taken

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock: True, or False where another process holds it (`wait`: block until it is free instead).
        A lock file that cannot be opened is a DapqError. Not POSIX: no lock, always True."""
        try:
            import fcntl
        except ImportError:
            return True
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise DapqError(
                f"The lock file {self.path} cannot be opened ({exc.strerror}): remove it if it is a link, or pass "
                "another path."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:  # unlinked while held: a process that opened it before retries on a dead file and skips
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise DapqError(f"{self.what} is being written by {self._holder}: wait for it, or use another --out.")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
