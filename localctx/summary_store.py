"""The summarizer's crash-safe store and its output files.

Every completed model call (a chunk or partial-summary summary) and every finished document is one
small JSON file, written to a temp file, fsynced and renamed into place: a SIGKILL leaves either the
whole file or nothing, so a re-run never repeats completed work and never reads a torn record.
An append-only `calls.jsonl` log (one write + fsync per line) records each model call for audit;
readers skip a torn last line."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .paths import cache_error
from .fsutil import atomic_write, locked


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dumps(obj: Any) -> str:
    """One line of JSON that always encodes as UTF-8. A file name that is not UTF-8 reaches Python
    as lone surrogates, which UTF-8 cannot hold: such a line is written with \\u escapes, which
    json.loads turns back into the same string."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The valid JSON-object lines of `path`; a torn or foreign line is skipped, never fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Store:
    """Completed chunk summaries and documents, keyed by hashes (see summarize.fingerprint)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.json"

    def _get(self, kind: str, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._file(kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable or torn: not done yet
            return None

    def _put(self, kind: str, key: str, data: dict[str, Any]) -> None:
        try:
            atomic_write(self._file(kind, key), dumps(data))
        except OSError as exc:
            raise cache_error(self.root, "summarizer's store", exc) from None

    def get_call(self, key: str) -> dict[str, Any] | None:
        return self._get("calls", key)

    def put_call(self, key: str, data: dict[str, Any]) -> None:
        self._put("calls", key, data)
        self.log({"event": "call", "key": key, **{k: v for k, v in data.items() if k != "summary"}})

    def get_document(self, key: str) -> dict[str, Any] | None:
        return self._get("documents", key)

    def put_document(self, key: str, record: dict[str, Any]) -> None:
        self._put("documents", key, record)
        self.log({"event": "document", "key": key, "status": record.get("status"), "sha256": record.get("sha256")})

    @property
    def log_path(self) -> Path:
        return self.root / "calls.jsonl"

    def log(self, event: dict[str, Any]) -> None:
        """Append one line with a single write and fsync: a kill cannot interleave two lines."""
        line = (dumps(event) + "\n").encode("utf-8")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise cache_error(self.root, "summarizer's store", exc) from None

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log_path)


# --- Output directory --------------------------------------------------------------------------

JSONL_NAME = "summaries.jsonl"


def write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Merge `records` into OUT/summaries.jsonl and replace the file atomically, under a lock.

    One line per path: a line for a path in `records` is replaced, every other line is kept as it
    was, byte for byte (another batch's documents, lines without a path, text that is not JSON),
    except blank lines, a repeated line for one path, and a torn last line (no newline, not JSON).
    The lock is held from the read to the rename, so batches sharing OUT never lose each other's
    lines; the rename means a reader, or a crash, never sees a torn file."""
    path = out / JSONL_NAME
    fresh = {r["path"]: r for r in records}
    with locked(path):
        lines = [line for line in _kept_lines(path) if _path_of(line) not in fresh]
        lines += [dumps(r).encode("utf-8") for r in fresh.values()]
        atomic_write(path, b"".join(line + b"\n" for line in lines))
    return path


def _kept_lines(path: Path) -> list[bytes]:
    """The existing lines worth keeping, deduplicated by path (the first line of a path wins)."""
    if not path.is_file():  # also a FIFO or a device in its place: never read (it could block)
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and not data.endswith(b"\n") and _json_object(lines[-1]) is None:
        lines.pop()  # torn by a writer that died mid-line (ours never tear: we rename whole files)
    kept, seen = [], set()
    for line in lines:
        key = _path_of(line)
        if not line.strip() or (key is not None and key in seen):
            continue
        seen.add(key)
        kept.append(line)
    return kept


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; JSON nested too deep
        return None
    return row if isinstance(row, dict) else None


def _path_of(line: bytes) -> str | None:
    """The document path a line is about, or None for a line that is not one of ours."""
    row = _json_object(line)
    path = row.get("path") if row is not None else None
    return path if isinstance(path, str) else None


def markdown(record: dict[str, Any]) -> bytes:
    chunks = f" · {record['chunks']} chunks" if record["chunks"] > 1 else ""
    meta = (f"*{record['strategy']} · {record['tokens']:,} tokens{chunks} · "
            f"{record['model']} · preset {record['preset']}*")
    text = f"# {record['path']}\n\n{record['summary'].strip()}\n\n{meta}\n"
    return text.encode("utf-8", "surrogateescape")  # a non-UTF-8 file name as its own bytes
