"""auto's ladder of windows as lanes: one llama.cpp context per ladder step in use, over the same
loaded weights (RoPE scaling and the window are per context in llama.cpp, so nothing is read from
disk again). Requests at the same step share their lane's context and batch there; a request that
needs another step gets a lane of that step beside the running ones, while memory allows.

Memory: the guard planned `streams` windows of the largest step (memory.Workload). The lanes never
hold more KV cells than that in all: a new lane first frees the idle ones (no running sequence),
then takes as many sequences as fit in what is left (at most n_seq, at least one); when not even
one fits, the request waits for running ones to finish. A request always runs at its own step:
its window is never shrunk, nor grown to share a larger lane."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ResourceError
from ..gguf_meta import ModelFacts
from ..params import RuntimeParams
from ..presets import Ladder
from .backend import Context, Model
from .sequences import Run, Scheduler, Slot


@dataclass(frozen=True)
class Switch:
    """A change of window: the parameters before and after, and the time the new llama.cpp
    context took to create (the weights stay loaded; the KV cache starts empty)."""

    before: RuntimeParams
    after: RuntimeParams
    seconds: float


class Lane:
    """One context of the ladder, its sequences (slots) and the scheduler that runs them."""

    def __init__(self, ctx: Context, facts: ModelFacts) -> None:
        self.ctx = ctx
        self.slots = [Slot(ctx, seq, facts) for seq in range(ctx.n_seq)]
        self.scheduler = Scheduler(ctx)

    @property
    def params(self) -> RuntimeParams:
        return self.ctx.params

    @property
    def cells(self) -> int:
        """KV cells held: every stream (the spare of an exact context included) of the window."""
        return self.ctx.streams * self.ctx.n_ctx

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.active)

    def free_slots(self) -> list[Slot]:
        busy = {r.slot.seq for r in self.scheduler.active}
        return [s for s in self.slots if s.seq not in busy]

    def close(self) -> None:
        for run in self.scheduler.active:
            run.end(flush=False)
        self.ctx.close()


class Windows:
    """The lanes of an engine; `current` is the one used last (what `Engine.params` reports)."""

    def __init__(self, model: Model, facts: ModelFacts, ladder: Ladder, *, n_seq: int, threads: int | None,
                 exact: bool = False) -> None:
        self.model, self.facts, self.ladder = model, facts, ladder
        self.n_seq, self.threads, self.exact = n_seq, threads, exact
        self.spare = 1 if exact else 0
        self.budget = (n_seq + self.spare) * ladder.top.n_ctx  # the cells memory was planned for
        self.switches: list[Switch] = []  # every new window, oldest first
        self.lanes: dict[RuntimeParams, Lane] = {}
        self._current: Lane | None = self._open(ladder.bottom, n_seq)

    def _open(self, params: RuntimeParams, n_seq: int) -> Lane:
        lane = Lane(Context(self.model, params, n_seq=n_seq, threads=self.threads, exact=self.exact), self.facts)
        self.lanes[params] = lane
        return lane

    @property
    def params(self) -> RuntimeParams:
        return self.current().params

    def current(self) -> Lane:
        if self._current is None:
            raise ResourceError("This model has no usable llama.cpp context (an earlier switch failed); reopen it.")
        return self._current

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self.lanes.values()))

    def in_use(self) -> list[dict[str, int]]:
        """Each lane's window, sequences and running requests, smallest window first."""
        lanes = sorted(self, key=lambda lane: lane.ctx.n_ctx)
        return [{"window": lane.ctx.n_ctx, "sequences": lane.ctx.n_seq, "running": len(lane.scheduler.active)}
                for lane in lanes]

    def runs(self) -> list[Run]:
        """The runs in progress, every lane's."""
        return [run for lane in self for run in lane.scheduler.active]

    def _room(self, params: RuntimeParams) -> int:
        """How many sequences a new lane at `params` could hold once the idle lanes are freed."""
        held = sum(lane.cells for lane in self if lane.busy)
        return min(self.n_seq, (self.budget - held) // params.n_ctx - self.spare)

    def can_start(self, needed: int) -> bool:
        """Whether a request of `needed` tokens can start now: its step's lane has a free sequence,
        or a lane of that step can be made beside the busy ones."""
        lane = self.lanes.get(self.ladder.step_for(needed))
        if lane is not None:
            return bool(lane.free_slots())
        return self._room(self.ladder.step_for(needed)) >= 1

    def use(self, needed: int) -> Switch | None:
        """Make the lane of the smallest step that holds `needed` tokens current (the largest when
        none does: the overflow check refuses those), opening it if needed. Returns the switch
        made, if a new context was."""
        step = self.ladder.step_for(needed)
        lane = self.lanes.get(step)
        if lane is not None and (lane.busy or lane.ctx.n_seq >= min(self.n_seq, self._room(step))):
            if not lane.free_slots():
                raise ResourceError(f"Every sequence of the {step.n_ctx:,}-token window is busy ({lane.ctx.n_seq} of "
                                    f"{lane.ctx.n_seq}); wait for one to finish.")
            self._current = lane
            return None
        n = self._room(step)
        if n < 1:
            raise ResourceError(f"No room for a {step.n_ctx:,}-token window beside the running sequences; "
                                "wait for them to finish.")
        return self._switch(step, n)

    def _switch(self, params: RuntimeParams, n_seq: int) -> Switch:
        """Idle lanes (and their KV caches) are freed first, so memory holds the busy lanes and the
        new one; if the new context cannot be created, the previous window is restored when no
        lane is left, and the error says so."""
        start = time.perf_counter()
        before = self._current.params if self._current is not None else self.ladder.bottom
        for lane in [lane for lane in self if not lane.busy]:
            self._drop(lane)
        try:
            lane = self._open(params, n_seq)
        except ValueError as exc:
            self._current = self._fallback(before, params, exc)
            raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}); the "
                                f"engine stays at {self._current.params.n_ctx:,} tokens. Use a smaller --ctx.") from None
        self._current = lane
        switch = Switch(before, params, time.perf_counter() - start)
        self.switches.append(switch)
        return switch

    def _fallback(self, before: RuntimeParams, params: RuntimeParams, exc: ValueError) -> Lane:
        """The lane to stay on after a failed switch: the current one if busy, another busy one,
        or the previous window made again."""
        if self._current is not None:
            return self._current
        if self.lanes:
            return next(iter(self.lanes.values()))
        try:
            return self._open(before, self.n_seq)
        except ValueError:
            raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}), nor "
                                "restore the previous one; reopen the model.") from None

    def _drop(self, lane: Lane) -> None:
        del self.lanes[lane.params]
        lane.close()
        if self._current is lane:
            self._current = None

    def close(self) -> None:
        for lane in self:
            self._drop(lane)
