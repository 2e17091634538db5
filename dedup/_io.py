"""Atomic writes: a temp file in the same folder, fsync, then os.replace.

A write that fails because of the output folder itself (disk full, quota, read-only file
system, no permission) is an :class:`~dedup.errors.OutputError` with a hint, not a traceback:
the run stops cleanly and every file written before stays valid. Any other failure propagates
unchanged, so bugs are never dressed up as disk trouble.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dedup.errors import OutputError

_P = ParamSpec("_P")
_R = TypeVar("_R")

# errno -> what it means for the output folder. Only these become OutputError.
OUTPUT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

# mkstemp makes 0600 files; outputs get the usual mode (0666 less the umask), like open() does,
# so a report or manifest can be read by the people and services it is written for. The umask
# can only be read by setting it: once, at import, before any thread of ours runs.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

# The names atomic_path gives its temp files: ".<name>.<host>-<pid>.<8 random chars>.tmp"
# (mkstemp). The owner says whether a leftover is stale: its process is gone.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_OWNED_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>[0-9]+)\.[A-Za-z0-9_]{8}\.tmp$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


DEFAULT_HINT = (
    "free space or fix permissions (or pick another --out), then rerun the same command: "
    "finished shards are kept and resumed"
)


def output_error(err: OSError, path: Path | str, *, hint: str = DEFAULT_HINT) -> OutputError | None:
    """The OutputError for ``err`` (raised while writing ``path``), or None if it is not one
    of :data:`OUTPUT_ERRNOS`."""
    what = OUTPUT_ERRNOS.get(err.errno or 0)
    if what is None:
        return None
    return OutputError(f"cannot write {path}: {what} ({err.strerror or err}); hint: {hint}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any failure the temp file is removed and ``path`` is left as it was.

    Raises:
        OutputError: the write failed for a reason in :data:`OUTPUT_ERRNOS`.
    """
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = f"{_HOST}-{os.getpid()}"  # per call: a forked worker is another owner
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{owner}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with suppress(OSError):  # e.g. a filesystem without modes
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)  # the rename itself survives a power cut, not only a kill
    except BaseException as err:
        if tmp is not None:
            with suppress(OSError):  # a read-only or vanished folder must not hide the cause
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and (translated := output_error(err, path)) is not None:
            raise translated from err
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp_path)`` and move the result into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def make_out_dir(out_dir: Path) -> Path:
    """``out_dir``, created if missing; an :class:`OutputError` if it is a file or cannot be made."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder; pick another path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {out_dir}: {err.strerror}") from None
    return out_dir


def is_temp_name(name: str) -> bool:
    """True for the name of a temp file :func:`atomic_path` leaves behind when killed."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(folder: Path) -> int:
    """Delete the temp files that killed writers left under ``folder``; returns how many.

    A temp file is stale when the process that made it is gone: one of this host whose pid is
    not running. A live writer's temp files (another dedup process on the same folder) and
    those of other hosts (a shared file system) are left alone.
    """
    removed = 0
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            owned = _OWNED_TEMP.match(name)
            if owned is None or owned["host"] != _HOST or _alive(int(owned["pid"])):
                continue
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def output_errors(*params: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a function that writes under its arguments ``params`` (output and work
    folders): an OSError of :data:`OUTPUT_ERRNOS` about a path inside one of them becomes
    OutputError.

    A backstop for the writes that do not go through :func:`atomic_path` (``mkdir`` of
    subfolders); errors about other paths (a source file, say) pass through unchanged.
    """

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(*args, **kwargs)
            except OSError as err:
                given = signature.bind_partial(*args, **kwargs).arguments
                folders: list[Any] = [given[p] for p in params if given.get(p) is not None]
                if err.filename and any(_inside(str(err.filename), Path(f)) for f in folders):
                    translated = output_error(err, err.filename)
                    if translated is not None:
                        raise translated from err
                raise

        return wrapper

    return decorate


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True
