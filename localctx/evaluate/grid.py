"""The one loop both evaluations share: for each preset, resolve it once, take finished cells from
the cache, mark cells past the window n/a, and load the model only when a cell is left to compute."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ..executor import Executor, LocalExecutor
from ..identity import model_identity
from ..memory import Workload
from ..params import RuntimeParams
from ..paths import writable_cache
from ..runtime import Resolved, RunSpec, resolve_spec
from .cache import CellCache

Progress = Callable[[str], None]
Cell = dict[str, Any]  # what a result row says about one cell: preset, length, ... and its result
Key = dict[str, Any]  # everything a cell's result depends on: its cache key


class EvalEngine(Protocol):
    """What evaluation needs from an engine (the real Engine, or a test's counting wrapper)."""

    n_ctx: int
    params: RuntimeParams

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...
    def logits_at(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray: ...
    def logits_many(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[np.ndarray]: ...
    def complete(self, tokens: Sequence[int], **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


EngineFactory = Callable[[Resolved], EvalEngine]


def eval_workload(parallel: int = 1) -> Workload:
    """Scoring, exact (a cell's result does not depend on threads or on the cells beside it), with
    `parallel` sequences: what an evaluation's engine is opened for, here and on Ray workers."""
    return Workload("score", parallel, exact=True)


def open_eval_engine(resolved: Resolved, parallel: int = 1) -> EvalEngine:
    from ..runtime import open_engine  # loads llama_cpp: only when a cell needs the model

    return open_engine(resolved, workload=eval_workload(parallel))


def same_step_groups(engine: EvalEngine, jobs: list[Any], n: int) -> Iterator[list[Any]]:
    """Jobs in groups of up to n whose cells run at the same window (an adaptive engine's step)."""
    def step(job: Any) -> RuntimeParams:
        return engine.ladder.step_for(job[0]["length"])

    group: list[Any] = []
    for job in jobs:
        if group and (len(group) == n or step(group[0]) != step(job)):  # n == 1: no ladder needed
            yield group
            group = []
        group.append(job)
    if group:
        yield group


@dataclass
class EvalResult:
    kind: str  # "ppl" | "passkey" | "ruler"
    model: str
    settings: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    computed: int = 0  # cells computed in this run (the rest came from the cache or were n/a)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "settings": self.settings, "cells": self.cells}


class Evaluation(Protocol):
    """One kind of evaluation, as the grid loop drives it."""

    kind: str
    settings: dict[str, Any]
    parallel: int  # cells of one window at once, as parallel sequences (1: one at a time)

    def cells(self, resolved: Resolved, model: str) -> list[tuple[Cell, Key]]:
        """Every cell of one preset (each with its 'length'), and its cache key."""

    def compute(self, engine: EvalEngine, resolved: Resolved, todo: list[tuple[Cell, Key]],
                progress: Progress) -> Iterator[tuple[Cell, Key, dict[str, Any]]]:
        """Compute the cells left to do, in whatever order suits the engine; yield each result."""

    def describe(self, cell: Cell, found: dict[str, Any]) -> str:
        """A cell's result in a few words, for progress lines."""

    def order(self, cell: Cell) -> tuple[Any, ...]:
        """Where a cell goes in the result, within its preset."""


def label(cell: Cell) -> str:
    if "task" in cell:
        depth = "" if cell["depth"] is None else f" depth {cell['depth']:g}"
        return f"{cell['preset']} {cell['length']:,} {cell['task']}{depth} sample {cell['sample']}"
    where = f" depth {cell['depth']:g} trial {cell['trial']}" if "depth" in cell else ""
    return f"{cell['preset']} {cell['length']:,}{where}"


def run_grid(evaluation: Evaluation, presets: Sequence[str], spec: RunSpec | Resolved, *,
             cache: CellCache | None = None, engine_factory: EngineFactory = open_eval_engine,
             progress: Progress = lambda _: None, compute: bool = True, executor: Executor | None = None) -> EvalResult:
    """Every cell of every preset; cached cells are not recomputed, and a preset's model is loaded
    only when one of its cells needs computing. With `compute=False` missing cells are reported as
    "not run" (a report of what a long run has finished so far). The cells left are computed where
    `executor` runs them (this process by default), and this process alone fills the cache and the result."""
    cache = cache or CellCache()
    if engine_factory is open_eval_engine and evaluation.parallel > 1:  # one engine, N sequences
        engine_factory = functools.partial(open_eval_engine, parallel=evaluation.parallel)
    if compute:  # cells are saved as they finish: a cache that cannot take them fails now, not after one
        writable_cache(cache.directory, "evaluation cache")
    base = spec if isinstance(spec, Resolved) else resolve_spec(replace(spec, preset=presets[0]))
    mkey = model_identity(base.facts.path)
    result = EvalResult(evaluation.kind, str(base.facts.path), evaluation.settings)
    plans = [(resolved, evaluation.cells(resolved, mkey)) for resolved in map(base.with_preset, presets)]
    total, done = sum(len(cells) for _, cells in plans), 0
    todos: list[tuple[Resolved, list[tuple[Cell, Key]]]] = []
    # Presets that resolve alike at a length (auto's first step and native) share a cell's key: it
    # is computed once in a run, and its twins take the result.
    twins: dict[str, list[Cell]] = {}
    for resolved, cells in plans:
        todo = []
        for cell, key in cells:
            window = resolved.params.n_ctx  # the largest: an adaptive preset runs each cell at its own step
            used = resolved.params_for(cell["length"])
            cell = {"preset": resolved.spec.preset, "method": used.method, "window": used.n_ctx, **cell,
                    "params": used.to_dict()}
            if cell["length"] > window:
                cell.update(status="n/a", reason=f"length {cell['length']:,} exceeds the preset's {window:,}-token window")
            elif (found := cache.get(key)) is not None:
                cell.update(found)
                progress(f"[{done + 1}/{total}] {label(cell)}: {evaluation.describe(cell, found)} (cached)")
            elif not compute:
                cell["status"] = "not run"
            elif (name := json.dumps(key, sort_keys=True)) in twins:
                twins[name].append(cell)
                continue
            else:
                twins[name] = []
                todo.append((cell, key))
                continue
            done += 1
            result.cells.append(cell)
        if todo:
            todos.append((resolved, todo))

    def finished(cell: Cell, key: Key, found: dict[str, Any]) -> None:
        nonlocal done
        cache.put(key, found)
        result.computed += 1
        done += 1
        progress(f"[{done}/{total}] {label(cell)}: {evaluation.describe(cell, found)} ({found['seconds']:.0f} s)")
        result.cells.append({**cell, **found})
        for twin in twins.pop(json.dumps(key, sort_keys=True), []):
            done += 1
            progress(f"[{done}/{total}] {label(twin)}: {evaluation.describe(twin, found)} (the same cell as {cell['preset']})")
            result.cells.append({**twin, **found})

    if todos:
        (executor or LocalExecutor()).evaluate(evaluation, todos, finished, progress, engine_factory)
    result.cells.sort(key=lambda c: (presets.index(c["preset"]), evaluation.order(c)))
    return result
