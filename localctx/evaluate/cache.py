"""Finished evaluation cells, one JSON file each: an interrupted run resumes, a repeated one is
instant, and concurrent runs never corrupt each other's results."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write
from ..paths import cache_dir, cache_error

# Bump when the meaning of a cached cell changes (scoring, prompt wording).
CACHE_VERSION = 1


class CellCache:
    """Cells under the user cache dir (or `directory`), keyed by everything the result depends on
    (the model by `identity.model_identity`, its parameters by `params.result_params`);
    a file whose stored key differs (a hash collision, an old layout) is a miss."""

    def __init__(self, directory: Path | None = None, enabled: bool = True) -> None:
        self.directory = directory or cache_dir() / "eval"
        self.enabled = enabled

    def _file(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        try:
            data = json.loads(self._file(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable or torn: not computed yet
            return None
        return data.get("result") if isinstance(data, dict) and data.get("key") == key else None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        # Saved even with enabled=False (--no-cache recomputes, and still keeps what it computed).
        try:
            atomic_write(self._file(key), json.dumps({"key": key, "result": result}))
        except OSError as exc:
            raise cache_error(self.directory, "evaluation cache", exc) from None
