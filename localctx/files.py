"""Opening the files a user names: regular files only, and never more than a bound.

A FIFO opened for reading blocks until a writer appears, and a device such as /dev/zero never
ends, so every path a user gives (model, document, preset, prompt file) is opened here without
blocking, checked with fstat on the opened descriptor (no race between a check and the open),
and refused unless it is a regular file."""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from .errors import InputError, LocalctxError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no FIFOs to guard against
    fcntl = None  # type: ignore[assignment]

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """'a directory', 'a named pipe (FIFO)', ... for a st_mode that is not a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


class NotRegularFile(OSError):
    """What `open_regular_file` raises for a path that is not a regular file; `kind` names it."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file but {kind}")
        self.kind = kind


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file, else raise NotRegularFile; any other
    failure is the OSError of the open. For callers that handle OSError themselves (a KV snapshot
    that cannot be read is a miss); `open_regular` is the form whose errors a user reads.

    Opened with O_NONBLOCK so a FIFO cannot block the open; regular files ignore the flag, and it
    is cleared anyway before the file is returned."""
    fd = os.open(os.fspath(path), os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(kind_of(mode))
        if _O_NONBLOCK and fcntl is not None:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | os.PathLike[str], error: type[LocalctxError] = InputError,
                 what: str = "file") -> BinaryIO:
    """Open `path` for binary reading, refusing anything but a regular file with `error`."""
    name = os.fspath(path)
    try:
        return open_regular_file(name)
    except NotRegularFile as exc:
        hint = " pass a file." if exc.kind == "a directory" else f" the {what} must be a regular file."
        raise error(f"{name} is {exc.kind};{hint}") from None
    except FileNotFoundError:
        raise error(f"File not found: {name}") from None
    except PermissionError:
        raise error(f"Cannot read {name}: permission denied.") from None
    except OSError as exc:
        raise error(_open_failure(name, exc, what)) from None


def _open_failure(name: str, exc: OSError, what: str) -> str:
    if exc.errno == errno.ENXIO:  # opening a socket, or a FIFO for writing with no reader
        try:
            kind = kind_of(os.stat(name).st_mode)
        except OSError:
            kind = "not a regular file"
        return f"{name} is {kind}; the {what} must be a regular file."
    if exc.errno == errno.ENAMETOOLONG:
        return f"Cannot read {name}: the name is too long for the filesystem."
    return f"Cannot read {name}: {exc.strerror or exc}."


def read_limited(path: str | os.PathLike[str], limit: int, error: type[LocalctxError] = InputError,
                 what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a larger one is refused unread)."""
    name = os.fspath(path)
    with open_regular(path, error, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise error(_too_large(name, size, limit, what))
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(f"Cannot read {name}: {exc.strerror or exc}.") from None
    if len(data) > limit:  # it grew while being read
        raise error(_too_large(name, len(data), limit, what))
    return data


def read_stream(stream: BinaryIO, limit: int, name: str = "stdin", error: type[LocalctxError] = InputError) -> bytes:
    """At most `limit` bytes of a stream (stdin): more is refused rather than held in memory."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise error(f"{name} holds more than {_size(limit)}; localctx reads at most that much text.")
    return data


def _too_large(name: str, size: int, limit: int, what: str) -> str:
    return (f"{name} is {_size(size)}; a {what} may be at most {_size(limit)} "
            "(far more text than any context window holds).")
