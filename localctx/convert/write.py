"""Writing a converted file: checks before anything is written, a streamed copy into a temp file
beside OUT (in-kernel where it can), fsync, and an atomic publish; an interrupt leaves no OUT."""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..fsutil import fsync_dir, name_max, probe_writable
from ..memory import human
from .encode import Piece, build_header, data_pieces, pieces_bytes
from .plan import Plan

TEMP_MARKER = ".localctx-tmp-"
COPY_CHUNK = 64 * 2**20  # bytes per in-kernel copy step (copy_file_range: no user-space buffer)
BUFFER_CHUNK = 8 * 2**20  # the one buffer of the fallback copy (across filesystems): bounds peak RSS
SPACE_MARGIN = 16 * 2**20




@dataclass(frozen=True)
class WriteStats:
    bytes: int
    seconds: float


def check_output(source: Path, out: Path, force: bool, *, probe: bool = True) -> None:
    """Refuse OUT before any work when it is IN (same path, symlink or hard link), a directory,
    exists without --force, has a name the filesystem cannot hold, or lies in a directory that
    cannot be written (`probe`: create and remove a file there; access() alone says yes to root
    even on a read-only filesystem)."""
    src = os.stat(source)
    try:
        dst = os.stat(out)  # follows a symlink: OUT pointing at IN is IN
    except FileNotFoundError:
        dst = None
    except OSError as exc:
        raise ConversionError(f"Cannot use {out} as output: {exc.strerror}.") from None
    if dst is not None and (dst.st_dev, dst.st_ino) == (src.st_dev, src.st_ino):
        raise ConversionError(
            f"{out} is the input file itself (same path, symlink or hard link). localctx never rewrites "
            "a model in place: give a new output path."
        )
    if out.is_dir():
        raise ConversionError(f"{out} is a directory; give the output file's path, e.g. {out / source.name}.")
    if not out.parent.is_dir():
        raise ConversionError(f"The output directory {out.parent} does not exist; create it first.")
    limit = name_max(out.parent)
    if len(os.fsencode(out.name)) > limit:
        raise ConversionError(f"The output name {out.name[:40]}… is {len(os.fsencode(out.name))} bytes long; "
                              f"the filesystem of {out.parent} allows at most {limit}. Choose a shorter name.")
    if os.path.lexists(out) and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it.")
    if probe:
        _probe_writable(out)


def _probe_writable(out: Path) -> None:
    try:  # named as OUT's temp files are, so a probe a killed run left is swept with them
        probe_writable(out.parent, prefix=f"{temp_prefix(out)}{os.getpid()}-")
    except OSError as exc:
        raise ConversionError(f"Cannot write the output in {out.parent}: {exc.strerror or exc}. "
                              "Choose a directory you can write to.") from None


def temp_prefix(out: Path) -> str:
    """The name prefix of OUT's temp files. A name too long to take the suffix (pid and random
    part) is replaced by its hash, so every OUT the filesystem can hold can be converted."""
    prefix = f".{out.name}{TEMP_MARKER}"
    if len(os.fsencode(prefix)) + 32 > name_max(out.parent):
        prefix = f".{hashlib.sha256(os.fsencode(out.name)).hexdigest()[:32]}{TEMP_MARKER}"
    return prefix


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp files that a killed run (SIGKILL, power loss) left beside OUT. The writer's pid is
    part of the name, so a conversion still running elsewhere keeps its file."""
    removed = []
    for path in out.parent.glob(temp_prefix(out) + "*"):
        pid_text = path.name[len(temp_prefix(out)):].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this very process cannot still be in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        raise ConversionError(
            f"Not enough free space in {directory}: the converted file needs {human(needed)} "
            f"and only {human(free)} is free. Free some space or write OUT elsewhere."
        )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. `timeout`, a service manager) cleans up like Ctrl-C instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_converted(plan: Plan, out: Path, *, force: bool = False,
                    before_publish: Callable[[Path], None] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> WriteStats:
    """Write the converted file to a temp file beside OUT, fsync it, run `before_publish` on it
    (verification), then move it to OUT. Any failure or interrupt removes the temp file."""
    check_output(plan.source, out, force)
    clean_stale_temps(out)
    with open(plan.source, "rb") as src:
        raw = _read_exact(src, plan.header.tensor_info_span[1], plan.source)
        header = build_header(plan, raw)
        del raw
        pieces = data_pieces(plan)
        total = len(header) + pieces_bytes(pieces)
        check_space(out.parent, total)
        start = time.perf_counter()
        tmp = out.parent / f"{temp_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
        with _sigterm_as_interrupt():
            try:
                _write_temp(src, tmp, header, pieces, plan, progress)
                if before_publish is not None:
                    before_publish(tmp)
                _publish(tmp, out, force)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return WriteStats(total, time.perf_counter() - start)


def _read_exact(fh: Any, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ConversionError(f"{path} changed while it was being read; try again.")
    return data


def _write_temp(src: Any, tmp: Path, header: bytes, pieces: list[Piece], plan: Plan,
                progress: Callable[[int, int], None] | None) -> None:
    if os.fstat(src.fileno()).st_size != plan.header.file_size:
        raise ConversionError(f"{plan.source} changed size since its header was read; try again.")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise ConversionError(f"Cannot create {tmp}: {exc.strerror}; nothing was written to the output.") from None
    try:
        try:
            _write_all(fd, header)
            _write_pieces(src.fileno(), fd, plan.header.data_offset, pieces, progress)
            os.fsync(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConversionError(f"The disk holding {tmp.parent} filled up while writing; "
                                      "nothing was written to the output. Free some space and retry.") from None
            raise ConversionError(f"Writing {tmp} failed: {exc}; nothing was written to the output.") from None
    finally:
        os.close(fd)


def _write_pieces(src_fd: int, dst_fd: int, data_offset: int, pieces: list[Piece],
                  progress: Callable[[int, int], None] | None) -> None:
    """The data section: IN's ranges streamed (copy_range), the new tensor's bytes written."""
    total, done = pieces_bytes(pieces), 0
    for piece in pieces:
        if isinstance(piece, tuple):
            offset, length = piece
            report = None if progress is None else (lambda n, _, base=done: progress(base + n, total))
            copy_range(src_fd, dst_fd, data_offset + offset, length, report)
            done += length
        else:
            _write_all(dst_fd, piece)
            done += len(piece)
            if progress is not None:
                progress(done, total)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Copy `length` bytes of src from `offset` to dst's current position, COPY_CHUNK at a time:
    in the kernel with copy_file_range where it works, else through one reused buffer. Either way
    memory use does not depend on the model's size."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    buf = None
    while done < length:
        n = min(COPY_CHUNK if use_kernel else BUFFER_CHUNK, length - done)
        if use_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel = False
                continue
        else:
            if buf is None:
                buf = memoryview(bytearray(BUFFER_CHUNK))
            copied = os.preadv(src_fd, [buf[:n]], offset + done)
            _write_all(dst_fd, buf[:copied])
        if copied == 0:
            raise ConversionError("The input file ended early (it changed during the copy); try again.")
        done += copied
        if progress is not None:
            progress(done, length)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Give the temp file its final name atomically. Without --force a hard link is used, which
    fails instead of clobbering an OUT that appeared meanwhile."""
    if force:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ConversionError(f"{out} appeared while converting; pass --force to replace it.") from None
        except OSError:  # a filesystem without hard links
            if os.path.lexists(out):
                raise ConversionError(f"{out} appeared while converting; pass --force to replace it.") from None
            os.replace(tmp, out)
        else:
            tmp.unlink()
    fsync_dir(out.parent)
