"""Where a batch's work runs. Summarize and evaluate hand their pending work to an executor and
never know where it runs: in this process (`LocalExecutor`, their default) or on Ray workers
(`localctx.distributed.RayExecutor`, which the API and the commands build only for workers= /
--workers or a Ray address). Either way this process alone stores, caches and emits every result.

This module imports neither of its callers (summarize, evaluate) nor the Ray side: what it takes
from them is typed by the few members it uses."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .memory import Workload
from .runtime import Resolved, open_engine

Progress = Callable[[str], None]
Cell = dict[str, Any]  # an evaluation cell's row (evaluate.grid.Cell)
Key = dict[str, Any]  # its cache key (evaluate.grid.Key)
CellTodo = list[tuple[Resolved, list[tuple[Cell, Key]]]]  # the cells left, grouped by preset
CellFound = Callable[[Cell, Key, dict[str, Any]], None]  # this process: cache a cell's result, add it to the result


class PendingBatch(Protocol):
    """A summary batch as its executor sees it (summarize._Batch): it stores and emits each document."""

    options: Any  # SummarizeOptions: the seed the model is opened with

    def run_here(self, engine: Any, pending: list[Any], close: bool) -> None: ...


class CellWork(Protocol):
    """An evaluation as its executor sees it (evaluate.grid.Evaluation)."""

    parallel: int  # cells of one window at once (Ray workers open their engines for as many)

    def compute(self, engine: Any, resolved: Resolved, todo: list[tuple[Cell, Key]],
                progress: Progress) -> Iterator[tuple[Cell, Key, dict[str, Any]]]: ...


class Executor(Protocol):
    """Runs a batch's pending work; every result comes back to this process, which keeps it."""

    def summarize(self, batch: PendingBatch, pending: list[Any], resolved: Resolved) -> None:
        """Summarize the pending documents (summarize.Document) of `batch`, which stores and emits each."""

    def evaluate(self, evaluation: CellWork, todo: CellTodo, found: CellFound, progress: Progress,
                 engine_factory: Callable[[Resolved], Any]) -> None:
        """Compute every cell of `todo` and hand each result to `found`. `engine_factory` is how this
        process opens a preset's engine (workers elsewhere open their own)."""


class LocalExecutor:
    """Runs the work in this process: one engine at a time, loaded when work needs it."""

    def summarize(self, batch: PendingBatch, pending: list[Any], resolved: Resolved) -> None:
        workload = Workload("generate", batch.options.parallel, exact=True)
        batch.run_here(open_engine(resolved, seed=batch.options.seed, workload=workload), pending, close=True)

    def evaluate(self, evaluation: CellWork, todo: CellTodo, found: CellFound, progress: Progress,
                 engine_factory: Callable[[Resolved], Any]) -> None:
        for resolved, cells in todo:
            progress(f"loading {resolved.facts.name} with preset {resolved.spec.preset} "
                     f"(window {resolved.params.n_ctx:,})")
            engine = engine_factory(resolved)
            try:
                for cell, key, result in evaluation.compute(engine, resolved, cells, progress):
                    found(cell, key, result)
            finally:
                engine.close()
