"""The evaluation's inputs: lengths, depths and preset lists as users write them, and the text
perplexity is measured on."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..documents import read_text
from ..errors import InputError

DEFAULT_TEXT = "pride_and_prejudice.txt"


def parse_lengths(text: str) -> list[int]:
    """'2k,4k,8192' → [2048, 4096, 8192] (k = 1024, as context sizes are counted)."""
    lengths = []
    for item in _items(text):
        m = re.fullmatch(r"(\d+)([kK]?)", item)
        if not m or int(m.group(1)) == 0:
            raise InputError(f"Bad length {item!r}: use token counts such as 2048 or 2k (k = 1024).")
        lengths.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return sorted(set(lengths))


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' → [0.0, 0.5, 1.0]: where the passkey sits, as a fraction of the filler."""
    depths = []
    for item in _items(text):
        try:
            depth = float(item)
        except ValueError:
            depth = -1.0
        if not 0.0 <= depth <= 1.0:
            raise InputError(f"Bad depth {item!r}: depths are fractions from 0 (start) to 1 (end).")
        depths.append(depth)
    return sorted(set(depths))


def parse_presets(text: str) -> list[str]:
    """'native, yarn-32k' → ['native', 'yarn-32k'], duplicates dropped, order kept."""
    return list(dict.fromkeys(_items(text)))


def _items(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError("Give at least one value (comma-separated).")
    return items


@dataclass(frozen=True)
class Text:
    """A text to score, with a short hash of its content for cache keys."""

    path: Path
    text: str
    sha: str


def default_text_path() -> Path:
    """The shared corpus beside the repository (`<repo>/../shared/corpus`), when run from a checkout."""
    repo = Path(__file__).resolve().parents[2]
    path = repo.parent / "shared" / "corpus" / DEFAULT_TEXT
    if not path.is_file():
        raise InputError(
            f"No default evaluation text: {path} does not exist (it is only there in a checkout "
            "beside ../shared/corpus). Pass --text FILE with a long plain-text file."
        )
    return path


def load_text(path: str | os.PathLike[str] | None) -> Text:
    path = Path(path) if path is not None else default_text_path()
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path} is empty.")
    return Text(path, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
