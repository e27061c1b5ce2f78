"""Scoring several token windows at once, as parallel sequences of one context whose prompt
chunks share llama_decode batches, with each row's logits bit-identical to the window scored alone.

Why that holds (llama.cpp as pinned, CPU; read from llama-batch.cpp, llama-kv-cache.cpp and
ggml-cpu ops.cpp, and measured: benchmarks/RESULTS.md §13): with one stream per sequence,
llama.cpp cuts a batch into micro-batches with `split_equal`, which gives every sequence of a
micro-batch the same number of rows and puts only consecutive sequence ids together. A row's
logits then depend on which flash-attention kernel its micro-batch takes, chosen by the rows per
stream: 64 or more, the tiled kernel; fewer, the one-row kernel; one row in one stream against 512
cells or more, the split-KV kernel (threads change it). Each kernel computes a row from its own
query and the unmasked cells only, so neither the neighbours nor the padded cell count changes it,
and the weight matrices are applied row by row. So each sequence is evaluated in pieces that keep
every row in the kernel it takes alone: a lone chunk of 64 rows or more is cut into pieces of 64
or more, a shorter one stays whole, and a batch holds pieces of one size only (so `split_equal`
cuts none of them). A one-row piece gets a companion token in its own stream, one position ahead
(where the row does not see it; its cell is removed after), as `Context(exact=True)` does for a
lone token in the spare stream."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import Cancelled
from .backend import Context
from .sequences import Slot

TILE = 64  # ggml-cpu's flash-attention query tile (GGML_FA_TILE_Q): 64 rows per stream or more take it
Request = tuple[Sequence[int], Sequence[int]]  # the tokens, and the indices whose next-token logits are wanted


def lone_microbatches(n: int, chunk: int, unit: int) -> list[int]:
    """The micro-batch sizes `n` tokens take alone: `Slot.decode`'s chunks, each cut by llama.cpp
    into micro-batches of `unit` (n_ubatch) rows."""
    out: list[int] = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        out += [min(unit, size - at) for at in range(0, size, unit)]
    return out


def pieces(n: int, chunk: int, unit: int, target: int) -> list[int]:
    """Sizes of the pieces `n` tokens are evaluated in beside others: each lone micro-batch cut into
    near-equal pieces of about `target`, never below TILE when the micro-batch is not."""
    out: list[int] = []
    for size in lone_microbatches(n, chunk, unit):
        k = max(1, min(-(-size // target), size // TILE))
        out += [size // k + (1 if i < size % k else 0) for i in range(k)]
    return out


def score_many(slots: Sequence[Slot], ctx: Context, n_vocab: int, requests: Sequence[Request],
               should_stop: Callable[[], bool] | None = None) -> list[np.ndarray]:
    """For each request, the next-token logits after each wanted index (shape len(positions) ×
    n_vocab), up to len(slots) requests at a time. The tokens stay in the slots."""
    for tokens, positions in requests:
        if any(p < 0 or p >= len(tokens) for p in positions):
            raise ValueError("positions must index into tokens")
    results: list[np.ndarray] = []
    for first in range(0, len(requests), len(slots)):
        wave = requests[first : first + len(slots)]
        results += _score_wave(list(slots[: len(wave)]), ctx, n_vocab, wave, should_stop)
    return results


def _score_wave(slots: list[Slot], ctx: Context, n_vocab: int, wave: Sequence[Request],
                should_stop: Callable[[], bool] | None) -> list[np.ndarray]:
    n_batch = ctx.params.n_batch
    unit = min(n_batch, ctx.params.n_ubatch)  # what one micro-batch holds (backend.Context)
    # Whole query tiles, and at least two: ggml converts each cell tile once per query tile.
    target = max(2 * TILE, unit // len(slots) // TILE * TILE)
    wanted = [sorted(set(positions)) for _, positions in wave]
    index = [{p: i for i, p in enumerate(w)} for w in wanted]
    out = [np.empty((len(w), n_vocab), dtype=np.float32) for w in wanted]
    todo = []  # per sequence: the sizes of the pieces still to evaluate
    for slot, (tokens, _) in zip(slots, wave):
        slot.clear()
        todo.append(pieces(len(tokens), slot.positions.chunk_limit(n_batch), unit, target))
    while any(todo):
        if should_stop is not None and should_stop():
            raise Cancelled("The request was cancelled.")
        size = next(t[0] for t in todo if t)
        fit = max(1, unit // max(size, 2))  # one micro-batch; a one-token piece takes its companion along
        # The sequences furthest behind first, so that batches stay full to the end.
        ready = sorted((s for s, t in enumerate(todo) if t and t[0] == size), key=lambda s: -len(todo[s]))
        batch = sorted(ready[:fit])
        _decode(ctx, n_vocab, [(slots[s], wave[s][0], index[s], out[s]) for s in batch], size)
        for s in batch:
            todo[s].pop(0)
    return [o[[ix[p] for p in positions]] if list(positions) != w else o
            for o, ix, w, (_, positions) in zip(out, index, wanted, wave)]


def _decode(ctx: Context, n_vocab: int, group: list[tuple[Slot, Sequence[int], dict[int, int], np.ndarray]],
            size: int) -> None:
    """One llama_decode: the next `size` tokens of each sequence of `group`; copies the wanted logits."""
    batch = ctx.batch
    batch.clear()
    rows, companions = [], []
    for slot, tokens, index, _ in group:
        first = len(slot.tokens)
        rows.append(slot.stage(batch, tokens[first : first + size], index.__contains__))
        if size == 1 and first + 1 < ctx.n_ctx:
            at = slot.positions.at(first + 1)
            batch.add(tokens[first], at, slot.seq, False)
            companions.append((slot.seq, at))
    try:
        ctx.decode(batch)
    finally:
        for seq, at in companions:
            ctx.seq_rm(seq, at, -1)
    for row, (slot, tokens, index, out) in zip(rows, group):
        first = len(slot.tokens)
        slot.tokens += tokens[first : first + size]
        for j in range(size):
            if first + j in index:
                out[index[first + j]] = np.ctypeslib.as_array(ctx.logits(row + j), shape=(n_vocab,))
