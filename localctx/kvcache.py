"""KV snapshots: the llama.cpp state after a long document's tokens, kept on disk and restored when
a later prompt begins with the same tokens under the same model and KV-relevant parameters.

A KV cache computed under one RoPE scaling, KV type or model is silently wrong under another, so a
snapshot is only ever found through its key: the model file's identity, every parameter that
changes what the cache holds (RoPE type, base and scale, the YaRN values, which is how the `auto`
step in use enters; K and V cache types; flash attention), the llama.cpp build that wrote it, and
the exact token prefix, stored in the file and compared token by token. Anything else is a miss.

A file is `MAGIC`, a JSON header (format, key, token count, payload size and CRC-32, and what
`localctx cache list` shows), the tokens, then llama.cpp's sequence state. The checksum is there
for corruption (a torn or bit-flipped file), not tampering: CRC-32 runs at several GB/s, so a
restore is bounded by reading the file, where SHA-256 (1 GB/s here) took most of the time. It is written to a temp
file and renamed into place, so a reader, or a second process saving the same document, sees a
whole file or none. A file that does not match in every respect is ignored with one warning and
recomputed: it never reaches llama.cpp unchecked. The directory is kept under `LOCALCTX_KV_CACHE_MAX`,
least recently used first out. Nothing here imports llama_cpp: the engine hands over the bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
import zlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import LocalctxError, ResourceError
from .files import open_regular_file
from .fsutil import atomic_write
from .memory import human, parse_size
from .params import RuntimeParams, kv_params
from .paths import cache_dir

FORMAT = 1
MAGIC = b"LCTXKV\r\n"
SUFFIX = ".kvs"
MAX_ENV = "LOCALCTX_KV_CACHE_MAX"
MIN_ENV = "LOCALCTX_KV_CACHE_MIN_TOKENS"
DEFAULT_MAX_BYTES = 4 * 2**30
DEFAULT_MIN_TOKENS = 2048  # shorter prompts evaluate in seconds: not worth a file
MAX_HEADER_BYTES = 2**20
STALE_TEMP_SECONDS = 3600  # a temp file this old was left by a killed process


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- Keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotKey:
    """Everything that decides what a KV cache holds, but the tokens."""

    model_id: str
    params: tuple[tuple[str, Any], ...]  # (field, value) for each of params.KV_FIELDS
    build: str  # the llama.cpp build (llama-cpp-python's version): its state format may change

    @classmethod
    def of(cls, model_id: str, params: RuntimeParams, build: str) -> SnapshotKey:
        return cls(model_id, kv_params(params), build)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_id": self.model_id, "params": dict(self.params), "build": self.build}

    @property
    def scope(self) -> str:
        """The directory name of this key's snapshots."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]


def _token_bytes(tokens: Sequence[int]) -> bytes:
    data = array("i", tokens)
    if sys.byteorder == "big":
        data.byteswap()  # files are little-endian int32
    return data.tobytes()


def prefix_hash(scope: str, tokens: Sequence[int]) -> str:
    return hashlib.sha256(scope.encode() + _token_bytes(tokens)).hexdigest()[:32]


# --- Settings ----------------------------------------------------------------------------------


def size_limit() -> int:
    """$LOCALCTX_KV_CACHE_MAX in bytes (4G, 500M, ...; 0 keeps no snapshots), default 4 GiB."""
    raw = os.environ.get(MAX_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    if raw == "0":
        return 0
    try:
        return parse_size(raw)
    except ResourceError:
        raise LocalctxError(f"{MAX_ENV}={raw!r} is not a size: use a number with an optional unit, such as "
                            "4G or 500M (0 keeps no snapshots).") from None


def snapshot_threshold() -> int:
    """$LOCALCTX_KV_CACHE_MIN_TOKENS: the shortest document (in tokens) worth a snapshot, default 2048."""
    raw = os.environ.get(MIN_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_TOKENS
    if not raw.isdigit():
        raise LocalctxError(f"{MIN_ENV}={raw!r} is not a number of tokens, such as 2048.")
    return int(raw)


# --- Files ---------------------------------------------------------------------------------------


@dataclass
class Entry:
    """A snapshot file as `localctx cache list` shows it."""

    path: Path
    bytes: int
    last_used: float
    tokens: int
    header: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        h = self.header
        return {"path": str(self.path), "bytes": self.bytes, "last_used": round(self.last_used, 3),
                "tokens": self.tokens, "model": h.get("model"), "preset": h.get("preset"),
                "scaling": h.get("scaling"), "kv_type": h.get("kv_type"), "created": h.get("created")}


class SnapshotFileError(Exception):
    """A snapshot file that is not exactly what its name promises (never shown as a traceback)."""


def read_header(f: BinaryIO) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotFileError("not a localctx KV snapshot")
    raw = f.read(4)
    if len(raw) != 4:
        raise SnapshotFileError("truncated header")
    (n,) = struct.unpack("<I", raw)
    if n > MAX_HEADER_BYTES:
        raise SnapshotFileError("header too large")
    text = f.read(n)
    if len(text) != n:
        raise SnapshotFileError("truncated header")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise SnapshotFileError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotFileError(f"format {header.get('format') if isinstance(header, dict) else '?'}, "
                                f"not {FORMAT}")
    for name in ("tokens", "payload_bytes"):
        if not isinstance(header.get(name), int) or header[name] < 0:
            raise SnapshotFileError(f"bad {name} in header")
    return header


@dataclass
class Found:
    tokens: int
    payload: bytearray
    path: Path


@dataclass
class KVStore:
    """The snapshot directory (default: the cache directory's `kv/`, resolved at each use), its
    size limit and the shortest prefix worth saving (default: `LOCALCTX_KV_CACHE_MAX`,
    `LOCALCTX_KV_CACHE_MIN_TOKENS`). Failures to write (a full disk, a read-only directory) are
    warnings: the answer is produced anyway, without a snapshot."""

    directory: Path | None = None
    max_bytes: int | None = None
    min_tokens: int | None = None
    warn: Callable[[str], None] = field(default=_warn_stderr, repr=False)

    @property
    def root(self) -> Path:
        return self.directory if self.directory is not None else cache_dir() / "kv"

    @property
    def limit(self) -> int:
        return self.max_bytes if self.max_bytes is not None else size_limit()

    @property
    def threshold(self) -> int:
        return self.min_tokens if self.min_tokens is not None else snapshot_threshold()

    def check(self) -> None:
        """Raise a clean error now for a malformed setting, rather than mid-generation."""
        _ = self.limit, self.threshold

    # --- lookup ------------------------------------------------------------------------------

    def find(self, key: SnapshotKey, tokens: Sequence[int]) -> Found | None:
        """The snapshot of exactly `tokens` under `key`, its payload verified; None on a miss. A bad
        file is reported and skipped."""
        path = self.path_for(key, tokens)
        try:
            payload = self._read(path, key, tokens)
        except FileNotFoundError:
            return None  # never saved, or evicted or replaced by another process a moment ago
        except (OSError, SnapshotFileError) as exc:
            self.warn(f"ignoring KV snapshot {path} ({exc}); the document is evaluated again")
            return None
        try:
            os.utime(path)  # its last use, for least-recently-used eviction
        except OSError:
            pass
        return Found(len(tokens), payload, path)

    def path_for(self, key: SnapshotKey, tokens: Sequence[int]) -> Path:
        scope = key.scope
        return self.root / scope / f"{len(tokens)}-{prefix_hash(scope, tokens)}{SUFFIX}"

    def _read(self, path: Path, key: SnapshotKey, tokens: Sequence[int]) -> bytearray:
        with open_regular_file(path) as f:
            header = read_header(f)
            if header.get("key") != key.to_dict():
                raise SnapshotFileError("its key does not match this model and parameters")
            if header["tokens"] != len(tokens):
                raise SnapshotFileError("its token count does not match its name")
            expected = _token_bytes(tokens)
            if f.read(len(expected)) != expected:
                raise SnapshotFileError("its tokens differ from the prompt's")
            # Checked against the file before anything is allocated: a foreign header may claim anything.
            if os.fstat(f.fileno()).st_size - f.tell() != header["payload_bytes"]:
                raise SnapshotFileError("truncated, or longer than its header says")
            payload = bytearray(header["payload_bytes"])
            if f.readinto(payload) != len(payload):
                raise SnapshotFileError("truncated while it was read")
        if zlib.crc32(payload) != header.get("payload_crc32"):
            raise SnapshotFileError("checksum mismatch: the file is corrupt")
        return payload

    # --- save --------------------------------------------------------------------------------

    def save(self, key: SnapshotKey, tokens: Sequence[int], payload: memoryview | bytes,
             about: dict[str, Any]) -> Path | None:
        """Write the snapshot of `tokens` atomically, then evict down to the limit. Returns its path,
        or None (with a warning) when it could not be kept."""
        size = len(payload)
        limit = self.limit
        if size > limit:
            if limit:
                self.warn(f"a KV snapshot of {len(tokens):,} tokens would take {human(size)}, more than "
                          f"{MAX_ENV}={human(limit)}: not saved")
            return None
        path = self.path_for(key, tokens)
        directory = path.parent
        header = {"format": FORMAT, "key": key.to_dict(), "tokens": len(tokens), "payload_bytes": size,
                  "payload_crc32": zlib.crc32(payload), "created": time.time(), **about}
        head = json.dumps(header).encode()
        # Not durable: a torn file fails its checksum and is recomputed, and an fsync of GBs would stall the answer.
        try:
            atomic_write(path, MAGIC + struct.pack("<I", len(head)) + head, _token_bytes(tokens), payload,
                         durable=False)
        except OSError as exc:
            self.warn(f"no KV snapshot saved in {directory} ({exc.strerror or exc}); the answer is not affected. "
                      f"Set LOCALCTX_CACHE_DIR to a writable directory with room, or pass --no-kv-cache.")
            return None
        self.evict(keep=path)
        return path

    # --- the directory -----------------------------------------------------------------------

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        files = []
        try:
            scopes = list(os.scandir(self.root))
        except OSError:
            return files
        for scope in scopes:
            if not scope.is_dir(follow_symlinks=False):
                continue
            try:
                for entry in os.scandir(scope.path):
                    if entry.name.endswith(SUFFIX) or entry.name.endswith(".tmp"):
                        try:
                            files.append((Path(entry.path), entry.stat(follow_symlinks=False)))
                        except OSError:
                            pass
            except OSError:
                pass
        return files

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used snapshots until the directory fits the limit (and temp files
        of killed writers); returns the bytes freed."""
        now, freed = time.time(), 0
        done = []
        for path, st in self._files():
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TEMP_SECONDS:
                    freed += _remove(path, st.st_size)
            else:
                done.append((st.st_mtime, path, st.st_size))
        total, limit = sum(size for _, _, size in done), self.limit
        for _, path, size in sorted(done):
            if total <= limit:
                break
            if path == keep:
                continue
            gone = _remove(path, size)
            total -= size if gone else 0
            freed += gone
        return freed

    def entries(self) -> list[Entry]:
        """Every snapshot, most recently used first (unreadable files are listed as such)."""
        out = []
        for path, st in self._files():
            if not path.name.endswith(SUFFIX):
                continue
            try:
                with open_regular_file(path) as f:
                    header = read_header(f)
            except (OSError, SnapshotFileError) as exc:
                header = {"error": str(exc)}
            out.append(Entry(path, st.st_size, st.st_mtime, int(header.get("tokens") or 0), header))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def clear(self) -> tuple[int, int]:
        """Delete every snapshot (and temp file); returns (files, bytes) removed. Files that cannot
        be deleted (a read-only directory) are an error naming how many and why."""
        count = freed = 0
        failed: list[str] = []
        for path, st in self._files():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed.append(exc.strerror or str(exc))
                continue
            count, freed = count + 1, freed + st.st_size
        for scope in self.root.glob("*") if self.root.is_dir() else []:
            try:
                scope.rmdir()
            except OSError:
                pass
        if failed:
            raise LocalctxError(f"Deleted {count} KV snapshot file(s) from {self.root}, but {len(failed)} could not "
                                f"be deleted ({failed[0]}).")
        return count, freed


def _remove(path: Path, size: int) -> int:
    try:
        path.unlink()
        return size
    except OSError:  # gone already (another process evicted it), or not ours to delete
        return 0


def snapshot_notice(timings: Any) -> str | None:
    """One line on what a request did with snapshots (its Timings), or None when it used none."""
    if timings.restored_tokens:
        return (f"[kv] restored {timings.restored_tokens:,} document tokens from a snapshot "
                f"({human(timings.snapshot_bytes)}) in {timings.snapshot_seconds:.2f} s")
    if timings.saved_tokens:
        return (f"[kv] saved a snapshot of {timings.saved_tokens:,} document tokens ({human(timings.snapshot_bytes)}) "
                f"in {timings.snapshot_seconds:.2f} s: the next prompt that starts with this document skips them")
    return None
