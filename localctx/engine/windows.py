"""auto's ladder of windows as lanes: one llama.cpp context per ladder step in use, over the same
loaded weights (RoPE scaling and the window are per context in llama.cpp, so nothing is read from
disk again). Requests at the same step share their lane's context and batch there; a request that
needs another step gets a lane of that step beside the running ones, while memory allows.

Memory: the guard planned N sequences at the largest step (memory.Workload), and that is the lanes'
budget, counted as memory.estimate counts it: each lane's KV cells and its context's compute
buffers. A new lane takes as many sequences (at most N) as fit beside the lanes already open; only
when not even one fits are the idle lanes (no running sequence) freed; if one still does not fit,
the request waits for running ones to finish. A request always runs at its own step: its window
is never shrunk, nor grown to share a larger lane."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..errors import ResourceError
from ..gguf_meta import ModelFacts
from ..memory import Workload, estimate
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

    def __init__(self, ctx: Context, facts: ModelFacts, nbytes: int) -> None:
        self.ctx, self.nbytes = ctx, nbytes  # nbytes: what the plan charges it (Windows.cost)
        self.slots = [Slot(ctx, seq, facts) for seq in range(ctx.n_seq)]
        self.scheduler = Scheduler(ctx)

    @property
    def params(self) -> RuntimeParams:
        return self.ctx.params

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

    def __init__(self, model: Model, facts: ModelFacts, ladder: Ladder, workload: Workload, *,
                 threads: int | None) -> None:
        self.model, self.facts, self.ladder, self.workload, self.threads = model, facts, ladder, workload, threads
        self.n_seq, self.exact = workload.n_seq, workload.exact
        self.budget = self.cost(ladder.top, self.n_seq)  # what memory was planned for
        self.switches: list[Switch] = []  # every new window, oldest first
        self.lanes: dict[RuntimeParams, Lane] = {}
        self._current: Lane | None = self._open(ladder.bottom, self.n_seq)

    def cost(self, params: RuntimeParams, n_seq: int) -> int:
        """A context's share of the memory plan: its KV cache and compute buffers (the weights and
        the process are charged once, whatever the lanes)."""
        est = estimate(self.facts, params, replace(self.workload, n_seq=n_seq))
        return est.kv_bytes + est.compute_bytes - est.overhead_bytes

    def _open(self, params: RuntimeParams, n_seq: int) -> Lane:
        ctx = Context(self.model, params, n_seq=n_seq, threads=self.threads, exact=self.exact)
        lane = Lane(ctx, self.facts, self.cost(params, n_seq))
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

    def _fit(self, params: RuntimeParams, beside: list[Lane]) -> int:
        """How many sequences (at most n_seq) a new lane at `params` can hold beside `beside`."""
        left = self.budget - sum(lane.nbytes for lane in beside)
        return next((n for n in range(self.n_seq, 0, -1) if self.cost(params, n) <= left), 0)

    def can_start(self, needed: int) -> bool:
        """Whether a request of `needed` tokens can start now: its step's lane has a free sequence,
        or a lane of that step fits beside the busy ones."""
        step = self.ladder.step_for(needed)
        lane = self.lanes.get(step)
        if lane is not None:
            return bool(lane.free_slots())
        return self._fit(step, [lane for lane in self if lane.busy]) >= 1

    def use(self, needed: int) -> Switch | None:
        """Make the lane of the smallest step that holds `needed` tokens current (the largest when
        none does: the overflow check refuses those), opening it if needed: beside the open lanes
        when it fits, else after freeing the idle ones. Returns the switch made, if a new context was."""
        step = self.ladder.step_for(needed)
        lane = self.lanes.get(step)
        if lane is not None:
            if not lane.free_slots():
                raise ResourceError(f"Every sequence of the {step.n_ctx:,}-token window is busy ({lane.ctx.n_seq} of "
                                    f"{lane.ctx.n_seq}); wait for one to finish.")
            self._current = lane
            return None
        n = self._fit(step, list(self))
        if n < 1:
            n = self._fit(step, [lane for lane in self if lane.busy])
            if n < 1:
                raise ResourceError(f"No room for a {step.n_ctx:,}-token window beside the running sequences; "
                                    "wait for them to finish.")
            for idle in [lane for lane in self if not lane.busy]:
                self._drop(idle)
        return self._switch(step, n)

    def _switch(self, params: RuntimeParams, n_seq: int) -> Switch:
        """A new lane; if llama.cpp cannot create its context, the engine stays on a lane it has
        (the previous window made again when none is left), and the error says so."""
        start = time.perf_counter()
        before = self._current.params if self._current is not None else self.ladder.bottom
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
        """The lane to stay on after a failed switch: the current one, another open one, or the
        previous window made again."""
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
