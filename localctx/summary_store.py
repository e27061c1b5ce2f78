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

from .fsutil import atomic_write


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def get_call(self, key: str) -> dict[str, Any] | None:
        return self._get("calls", key)

    def put_call(self, key: str, data: dict[str, Any]) -> None:
        atomic_write(self._file("calls", key), json.dumps(data, ensure_ascii=False))
        self.log({"event": "call", "key": key, **{k: v for k, v in data.items() if k != "summary"}})

    def get_document(self, key: str) -> dict[str, Any] | None:
        return self._get("documents", key)

    def put_document(self, key: str, record: dict[str, Any]) -> None:
        atomic_write(self._file("documents", key), json.dumps(record, ensure_ascii=False))
        self.log({"event": "document", "key": key, "status": record.get("status"), "sha256": record.get("sha256")})

    @property
    def log_path(self) -> Path:
        return self.root / "calls.jsonl"

    def log(self, event: dict[str, Any]) -> None:
        """Append one line with a single write and fsync: a kill cannot interleave two lines."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log_path)


# --- Output directory --------------------------------------------------------------------------

JSONL_NAME = "summaries.jsonl"


def write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Merge `records` into OUT/summaries.jsonl (one line per path; lines for paths outside this
    batch are kept) and rewrite the file atomically, so it never has torn or duplicate lines."""
    path = out / JSONL_NAME
    fresh = {r["path"]: r for r in records}
    kept = [r for r in read_jsonl(path) if r.get("path") not in fresh]
    seen: set[str] = set()
    lines = []
    for row in [*kept, *fresh.values()]:
        if row.get("path") in seen:
            continue
        seen.add(row.get("path"))
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write(path, "".join(line + "\n" for line in lines))
    return path


def markdown(record: dict[str, Any]) -> str:
    chunks = f" · {record['chunks']} chunks" if record["chunks"] > 1 else ""
    meta = (f"*{record['strategy']} · {record['tokens']:,} tokens{chunks} · "
            f"{record['model']} · preset {record['preset']}*")
    return f"# {record['path']}\n\n{record['summary'].strip()}\n\n{meta}\n"
