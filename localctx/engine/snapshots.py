"""KV snapshots of a sequence: a long document's state saved from any sequence and restored into
any sequence (llama_state_seq_get_data / set_data with its id), found through kvcache's key."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..gguf_meta import ModelFacts
from ..identity import model_identity
from ..kvcache import KVStore, SnapshotKey, snapshot_threshold
from ..params import RuntimeParams
from .backend import VERSION
from .sequences import Slot, Timings


class Snapshots:
    """Where a slot's document prefix comes from: its own cells, a snapshot, or an evaluation
    (then saved as one). `store` None: no snapshots, only the fixed split."""

    def __init__(self, facts: ModelFacts, store: KVStore | None) -> None:
        self.facts, self.store = facts, store
        self._model_id: str | None = None

    @property
    def threshold(self) -> int:
        return self.store.threshold if self.store is not None else snapshot_threshold()

    def key(self, params: RuntimeParams, layout: str = "") -> SnapshotKey:
        """What a snapshot taken now is valid for: this model file, the parameters of the window in
        use (with `auto`, the step), this llama.cpp build."""
        if self._model_id is None:
            self._model_id = model_identity(self.facts.path)
        return SnapshotKey.of(self._model_id, params, f"{VERSION} {layout}".strip())

    def _key_or_none(self, params: RuntimeParams, layout: str) -> SnapshotKey | None:
        try:
            return self.key(params, layout)
        except OSError as exc:  # the model file went away or became unreadable after loading
            if self.store is not None:
                self.store.warn(f"cannot fingerprint {self.facts.path} ({exc.strerror or exc}): no KV snapshot "
                                "used or saved")
            return None

    def document(self, slot: Slot, tokens: list[int], end: int, timings: Timings,
                 should_stop: Callable[[], bool] | None = None) -> int | None:
        """Bring the document, `tokens[:end]`, into the slot: kept from its last use, restored from
        a snapshot, or evaluated (and saved as one). Returns where the rest starts (`end`), or None
        when the document is too short to keep (left to prefix matching).

        The document is always evaluated alone and from the first token, and the rest after it,
        with or without snapshots: llama.cpp's CPU flash-attention kernels give different logits
        for different batch splits (up to 1.2 on the default model; benchmarks/RESULTS.md), so
        this fixed split is what makes an answer after a restore equal a fresh one."""
        end = min(end, len(tokens) - 1)  # the last prompt token is evaluated with the rest, for its logits
        if slot.positions.extended:
            return None  # its cells hold grouped positions: not a state a snapshot key describes (yet)
        if end < self.threshold:
            return None
        if slot.held(tokens) >= end:
            return end
        params = slot.ctx.params
        key = self._key_or_none(params, slot.ctx.layout) if self.store is not None else None
        if self.store is not None and key is not None:
            start = time.perf_counter()
            found = self.store.find(key, tokens[:end])
            restored = found is not None and self.restore(slot, found.payload, tokens[:end], str(found.path))
            timings.snapshot_seconds += time.perf_counter() - start
            if restored:
                timings.restored_tokens, timings.snapshot_bytes = end, len(found.payload)
                return end
        slot.extend(0, tokens[:end], should_stop)
        if self.store is not None and key is not None:
            start = time.perf_counter()
            state = slot.ctx.state(slot.seq)
            if self.store.save(key, tokens[:end], state, self._about(params)) is not None:
                timings.saved_tokens, timings.snapshot_bytes = end, len(state)
            timings.snapshot_seconds += time.perf_counter() - start
        return end

    def restore(self, slot: Slot, payload: bytearray, tokens: Sequence[int], origin: str) -> bool:
        slot.clear()
        if not slot.ctx.set_state(slot.seq, payload):
            slot.clear()
            if self.store is not None:
                self.store.warn(f"llama.cpp did not accept KV snapshot {origin}; the document is evaluated again")
            return False
        slot.tokens = list(tokens)
        return True

    def _about(self, p: RuntimeParams) -> dict[str, Any]:
        return {"model": self.facts.path.name, "model_path": str(self.facts.path), "preset": p.preset,
                "scaling": p.scaling, "n_ctx": p.n_ctx,
                "kv_type": p.type_k if p.type_k == p.type_v else f"{p.type_k}/{p.type_v}"}
