"""Crash-safe file writing shared by every module that writes (converter, summarizer, chat, eval
cells and plots, KV snapshots): atomic replacement, an inter-process lock, and early checks that a
directory can be written."""
from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LocalctxError


def atomic_write(path: Path, *parts: str | bytes | memoryview, durable: bool = True) -> None:
    """Write `parts`, one after the other, to `path` so that readers (and a re-run after a crash)
    see all of it or none. A failure leaves `path` as it was (a previous file stays intact) and no
    temp file behind. `durable=False` skips the fsyncs, for a file whose reader checks it anyway and
    whose loss costs only a recomputation (a KV snapshot of gigabytes)."""
    data = [p.encode("utf-8") if isinstance(p, str) else p for p in parts]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should look like any file
        with os.fdopen(fd, "wb") as f:
            for part in data:
                f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def _temp_prefix(path: Path) -> str:
    """`.NAME.` (a temp file shows whose it is), or a fixed prefix where NAME is too long to take the
    temp file's 12 more bytes: every name the filesystem holds can be written."""
    prefix = f".{path.name}."
    return prefix if len(os.fsencode(prefix)) + 12 <= name_max(path.parent) else ".localctx-"


def probe_writable(directory: Path, prefix: str = ".localctx-probe-") -> None:
    """Raise the OSError that writing a file in `directory` would meet, by creating and removing
    one: access() says yes to root even on a read-only filesystem. `prefix` names the probe so a
    caller's sweep of its own stale temp files also finds one a killed process left."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".probe")
    os.close(fd)
    os.unlink(probe)


def name_max(directory: Path) -> int:
    """The longest file name (in bytes) the filesystem holding `directory` allows."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


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
    directory is not writable (probed: nothing is left behind, and no directory is created here)."""
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
    try:
        probe_writable(probe)
    except OSError as exc:
        raise LocalctxError(f"{option} {path}: {probe} is not writable ({exc.strerror or exc}). "
                            "Give a directory you can write to.") from None
