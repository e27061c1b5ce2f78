"""Crash-safe file writing shared by the converter, the summarizer and chat: atomic replacement,
an inter-process lock, and an early check that an output directory can be written."""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LocalctxError


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` so that readers (and a re-run after a crash) see all of it or none.
    A failure leaves `path` as it was (a previous file stays intact) and no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should look like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable: POSIX flushes the directory entry only on its fsync."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for `path` across processes for the duration of the block: a
    read-modify-replace of `path` by another process waits instead of losing this one's update.
    The lock is on a hidden file beside `path` (`path` itself is replaced by renames, so a lock on
    it would guard a file that is no longer there). It is never deleted: deleting it would let two
    processes lock two different files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock, also when the block raised


def check_output_dir(path: Path, option: str) -> None:
    """Fail before any work when `path` cannot become a writable directory: it exists and is not a
    directory (a file, /dev/null, a dangling link), a part of it is a file, or the nearest existing
    directory is not writable. Nothing is created here."""
    probe = Path(os.path.abspath(path))
    try:
        while not (probe.exists() or probe.is_symlink()):
            probe = probe.parent
        is_dir = probe.is_dir()
    except OSError as exc:
        raise LocalctxError(f"{option} {path}: cannot check it ({exc.strerror or exc}).") from None
    if not is_dir:
        where = "exists and is not a directory" if probe == Path(os.path.abspath(path)) \
            else f"cannot be created: {probe} is not a directory"
        raise LocalctxError(f"{option} {path} {where}. Give a directory path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LocalctxError(f"{option} {path}: {probe} is not writable. Give a directory you can write to.")
