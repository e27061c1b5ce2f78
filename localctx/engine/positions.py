"""Where each token of a sequence sits: at its index (native), or under Self-Extend, with the
oldest tokens grouped G to one so that no position reaches the trained context."""
from __future__ import annotations

from ..params import RuntimeParams
from .backend import Context


class Positions:
    """The position policy of one sequence. Native: position = index. Self-Extend: the first
    `grouped` tokens share positions G to one and the rest follow one by one."""

    def __init__(self, params: RuntimeParams) -> None:
        self.group = params.group_size if params.self_extend else 1
        self.window = params.neighbor_window
        self.trained = params.trained_ctx
        self.grouped = 0

    @property
    def extended(self) -> bool:
        return self.group > 1

    def reset(self) -> None:
        self.grouped = 0

    def at(self, index: int) -> int:
        c = self.grouped
        if index < c:
            return index // self.group
        return c // self.group + (index - c)

    def chunk_limit(self, n_batch: int) -> int:
        # Grouping can keep a batch below the trained context only if the batch is at most the
        # neighbour window; up to it, the same batches as without (the same logits).
        return max(1, min(n_batch, self.window)) if self.extended else n_batch

    def before(self, ctx: Context, seq: int, n: int, b: int) -> None:
        """Before evaluating tokens [n, n + b): move the oldest tokens out of the exact region (into
        grouped positions) until no position of the batch reaches the trained context. Positions
        are edited in the KV cache (llama.cpp re-rotates the keys at the next decode): every grouped
        token ends at index // G, the rest one apart after the last group.

        Only llama_memory_seq_add is used, one token at a time for the grouped ones:
        llama_memory_seq_div records the opposite of the shift it makes, so its keys are re-rotated
        the wrong way (measured: a key divided from position 100 to 50 gives logits off by 13, a key
        added from 100 to 50 by 0.8, the same as no edit at all; tests/test_self_extend.py)."""
        if not self.extended:
            return
        g, trained = self.group, self.trained
        # Lazily: nothing is grouped while the sequence fits the trained context, and then only as
        # many of the oldest tokens as keep the batch's last position below it, c/g + (n + b - c) <=
        # trained. The exact region shrinks as the input grows, to the neighbour window at the
        # preset's reach ((trained - window) x g + window).
        need = -(-(n + b - trained) * g // (g - 1))
        c_old = self.grouped
        if need <= c_old:
            return
        c_new = min(-(-need // g) * g, n - n % g)  # whole groups, of tokens already evaluated
        if c_new <= c_old:
            return
        p0, moved, tail = c_old // g, c_new - c_old, n - c_new
        # Token c_old + k sits at p0 + k and goes to p0 + k // g. In increasing k, no token already
        # moved sits at a position still to be addressed, so each edit touches exactly one cell.
        for k in range(moved):
            if k // g != k:
                ctx.seq_add(seq, p0 + k, p0 + k + 1, k // g - k)
        if tail:
            ctx.seq_add(seq, p0 + moved, p0 + moved + tail, moved // g - moved)
        self.grouped = c_new
