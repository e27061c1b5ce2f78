"""What identifies a model file, for every key of stored work: KV snapshots, eval cells and
summaries all name their model by `model_identity`, so a renamed or copied file keeps its work and
a converted, requantized or fine-tuned one does not."""
from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLE = 2**20  # bytes read at each of the model file's sample points
_SAMPLES = 64


def model_identity(path: Path) -> str:
    """A content fingerprint of a model file, cheap for any size: its length, its first and last
    MiB (the GGUF header: architecture, metadata, tensor layout) and 64 MiB-sized samples spread
    over the weights. A converted, requantized or fine-tuned file differs in these; a rename or a
    copy does not."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        for i in range(_SAMPLES + 1):
            offset = max(0, size - _SAMPLE) * i // _SAMPLES
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()
