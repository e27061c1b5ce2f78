"""auto's ladder of windows: one llama.cpp context at a time over the loaded weights, replaced by a
context of another step when a request needs it (RoPE scaling and the window are per context in
llama.cpp, so nothing is read from disk again)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ResourceError
from ..params import RuntimeParams
from ..presets import Ladder
from .backend import Context, Model


@dataclass(frozen=True)
class Switch:
    """A change of window: the parameters before and after, and the time the new llama.cpp
    context took to create (the weights stay loaded; the KV cache starts empty)."""

    before: RuntimeParams
    after: RuntimeParams
    seconds: float


class Windows:
    """The context in use and the ladder it moves on; every context holds `n_seq` sequences."""

    def __init__(self, model: Model, ladder: Ladder, *, n_seq: int, threads: int | None, exact: bool = False) -> None:
        self.model, self.ladder, self.n_seq, self.threads, self.exact = model, ladder, n_seq, threads, exact
        self.switches: list[Switch] = []  # every change of window, oldest first
        self.ctx: Context | None = self._context(ladder.bottom)

    def _context(self, params: RuntimeParams) -> Context:
        return Context(self.model, params, n_seq=self.n_seq, threads=self.threads, exact=self.exact)

    @property
    def params(self) -> RuntimeParams:
        return self.current().params

    def current(self) -> Context:
        if self.ctx is None:
            raise ResourceError("This model has no usable llama.cpp context (an earlier switch failed); reopen it.")
        return self.ctx

    def use(self, needed: int) -> Switch | None:
        """Run at the smallest step that holds `needed` tokens (the largest when none does: the
        overflow check refuses those). Returns the switch made, if any."""
        step = self.ladder.step_for(needed)
        if step == self.current().params:
            return None
        return self.switch_to(step)

    def switch_to(self, params: RuntimeParams) -> Switch:
        """The old context (and its KV cache) is freed first, so memory in use is the new window's;
        if the new one cannot be created, the old window is restored and the error says so."""
        start, before = time.perf_counter(), self.current().params
        self.current().close()
        self.ctx = None
        try:
            self.ctx = self._context(params)
        except ValueError as exc:
            try:
                self.ctx = self._context(before)
            except ValueError:
                raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}), nor "
                                    "restore the previous one; reopen the model.") from None
            raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}); the "
                                f"engine stays at {before.n_ctx:,} tokens. Use a smaller --ctx.") from None
        switch = Switch(before, params, time.perf_counter() - start)
        self.switches.append(switch)
        return switch

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
