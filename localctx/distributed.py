"""Summarize and evaluate on Ray: long-lived worker processes (actors) that each load the model once
and answer many small tasks, and a driver (this process) that alone writes the summarizer's store,
`summaries.jsonl` and the evaluation cache, exactly as one process does.

    driver: plan ─▶ tasks ─▶ Pool (ray.wait) ─▶ results ─▶ store / cache / output
    worker: Worker actor: engine loaded once per preset; plan, group, model call, evaluation cell

Tasks: summarize plans every document on the workers (the driver loads no model: it has no
tokenizer), then runs each document's flow (summarize.summary_flow): every map chunk of every
document is a task, then reduce groups, level by level; each evaluation cell is a task. A result is
independent of which worker computed it and what that worker ran before (the engine's fixed
splits: Engine.generate's head_end), so the output equals one process's.

Batches: with --parallel N each worker opens its engine with N sequences, and the pool hands an
idle worker up to N queued tasks of one kind (model calls of any documents; cells of one preset)
in one actor call (Worker.execute_many, Worker.evaluate_many), which runs them as parallel
sequences, as one process does with --parallel N; each task still has its own outcome. At
--parallel 1 (the default) every actor call is one task. Results are exact either way: a task
that shared a batch gets what it gets alone (docs/architecture.md, "What batching does to results").

Faults: a worker that dies (SIGKILL, out of memory, ray.kill) loses only its tasks: they go to
another worker and the dead one is replaced; a task whose worker dies twice fails (its document is
recorded failed, the batch goes on). Ctrl-C stops the workers and raises Interrupted; everything
finished is already stored, so the same command resumes.

The model reaches workers by its path: a cluster's nodes must see the same file (shared storage),
and have localctx installed. Ray is imported here only, and only when --workers or --ray is given.
"""
from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from . import engine as _llama  # noqa: F401  llama.cpp before numpy, also in a worker (it imports this module first)
from . import errors
from .cluster import Cluster
from .errors import InputError, Interrupted, LocalctxError, ResourceError
from .evaluate.grid import Cell, Evaluation, Key, eval_workload
from .executor import CellFound, CellTodo, Progress
from .memory import Workload
from .params import default_threads
from .runtime import Resolved, open_engine
from .summarize import (Call, Document, Flow, Plan, Reporter, Request, SummarizeOptions, Summarizer,
                        _Batch, call_key, document_result, error_message, failed_result, summary_flow)

MAX_ATTEMPTS = 2  # a task whose worker dies this many times fails
ENV_PREFIX = "LOCALCTX_"  # the driver's settings (user directory, KV cache limits) reach its workers


# --- What travels between the driver and its workers ---------------------------------------------


@dataclass(frozen=True)
class SummarizeJob:
    """A batch's settings, the same for every task of it: what a worker loads its Summarizer with."""

    resolved: Resolved
    options: SummarizeOptions
    fp: str  # the batch's fingerprint (summarize.fingerprint)

    @property
    def parallel(self) -> int:
        return self.options.parallel

    @property
    def workload(self) -> Workload:
        # exact: a one-thread worker gives what a process with any thread count gives (memory.Workload)
        return Workload("generate", self.parallel, exact=True)


@dataclass(frozen=True)
class EvaluateJob:
    evaluation: Evaluation
    parallel: int = 1  # cells of one preset a worker evaluates at once (evaluation.parallel)

    @property
    def workload(self) -> Workload:
        return eval_workload(self.parallel)  # what one process opens (open_eval_engine)


Job = SummarizeJob | EvaluateJob


@dataclass(frozen=True)
class Done:
    """A task's value, and the worker (index, process) that computed it. `batch`: the tasks of the
    actor call it came in; `n_seq`: the sequences of the worker's engine (with both above 1, the
    call's model work ran as parallel sequences)."""

    value: Any
    worker: int
    pid: int
    batch: int = 1
    n_seq: int = 1


@dataclass(frozen=True)
class Failed:
    """A task that raised: a user-facing error travels as data, not as a Ray exception."""

    error: str  # the LocalctxError subclass' name (errors.py)
    message: str


@dataclass(frozen=True)
class Died:
    """A task whose worker died MAX_ATTEMPTS times."""

    message: str


Outcome = Done | Failed | Died


@dataclass(frozen=True)
class PlanTask:
    """Plan pending document `doc` (its place among the batch's unique pending documents). Plans
    only count tokens: one per actor call, so they spread over the workers."""

    doc: int
    document: Document
    group: ClassVar[Hashable | None] = None  # never batched

    def call(self, actor: Any) -> Any:
        return actor.plan.remote(self.document)

    @staticmethod
    def call_many(actor: Any, tasks: list[Any]) -> Any:
        raise AssertionError("plans are not batched")


@dataclass(frozen=True)
class RequestTask:
    """Answer request `index` of document `doc`'s current round (a model call or a grouping)."""

    doc: int
    index: int
    request: Request
    group: ClassVar[Hashable | None] = "request"  # any requests of any documents batch together

    def call(self, actor: Any) -> Any:
        return actor.execute.remote(self.request)

    @staticmethod
    def call_many(actor: Any, tasks: list[RequestTask]) -> Any:
        return actor.execute_many.remote([t.request for t in tasks])


@dataclass(frozen=True, eq=False)
class CellTask:
    """Compute evaluation cell `index` (its place in the cells left to do) of the preset `preset`
    (its place in the todo): cells batch only with cells of the same preset (one engine)."""

    index: int
    preset: int
    resolved: Resolved
    cell: Cell
    key: Key

    @property
    def group(self) -> Hashable:
        return ("cell", self.preset)

    def call(self, actor: Any) -> Any:
        return actor.evaluate.remote(self.resolved, self.cell, self.key)

    @staticmethod
    def call_many(actor: Any, tasks: list[CellTask]) -> Any:
        return actor.evaluate_many.remote(tasks[0].resolved, [(t.cell, t.key) for t in tasks])


Tag = PlanTask | RequestTask | CellTask


# --- The worker -----------------------------------------------------------------------------------


def _failed(exc: BaseException) -> Failed:
    if isinstance(exc, LocalctxError):
        return Failed(type(exc).__name__, str(exc))
    # a bug or a llama.cpp failure: recorded like one process records it
    return Failed("LocalctxError", f"{type(exc).__name__}: {exc}")


class Worker:
    """One worker process. It loads the model on its first task and keeps it (one engine at a
    time: an evaluation over several presets reloads when the preset changes), with the job's
    `parallel` sequences. Every method returns Outcomes: a user-facing error travels as data, not
    as a Ray exception. The `_many` methods answer several tasks in one call, as parallel
    sequences; each task gets its own outcome, so a failing one fails alone."""

    def __init__(self, index: int, threads: int, env: dict[str, str], job: Job) -> None:
        os.environ.update(env)
        self.index, self.threads, self.job = index, threads, job
        self.engine: Any = None
        self.resolved: Resolved | None = None
        self.summarizer: Summarizer | None = None

    def _done(self, value: Any, batch: int = 1) -> Done:
        n_seq = getattr(self.engine, "n_seq", 1) if self.engine is not None else 1
        return Done(value, self.index, os.getpid(), batch, n_seq)

    def _outcome(self, work: Callable[[], Any], batch: int = 1) -> Outcome:
        try:
            return self._done(work(), batch)
        except Exception as exc:
            return _failed(exc)

    def _engine(self, resolved: Resolved, seed: int = 0) -> Any:
        if self.engine is None or self.resolved != resolved:
            if self.engine is not None:
                self.engine.close()
                self.engine = self.summarizer = None
            spec = replace(resolved.spec, threads=self.threads)
            self.engine = open_engine(Resolved(spec, resolved.facts, resolved.ladder), seed=seed,
                                      workload=self.job.workload)
            self.resolved = resolved
        return self.engine

    def _summarizer(self) -> Summarizer:
        job = self.job
        assert isinstance(job, SummarizeJob)
        engine = self._engine(job.resolved, seed=job.options.seed)
        if self.summarizer is None:
            self.summarizer = Summarizer(engine, None, job.options, job.fp, Reporter())  # type: ignore[arg-type]
        return self.summarizer

    def ready(self) -> Outcome:
        """Load what the job needs now: a bad setting fails once, before any task."""
        def load() -> None:
            if isinstance(self.job, SummarizeJob):
                self._summarizer()

        return self._outcome(load)

    def plan(self, doc: Document) -> Outcome:
        return self._outcome(lambda: self._summarizer().plan(doc))

    def execute(self, request: Request) -> Outcome:
        return self._outcome(lambda: self._summarizer().execute(request))

    def execute_many(self, requests: list[Request]) -> list[Outcome]:
        """Several requests at once: the model calls as parallel sequences (Summarizer.run_calls),
        groupings one by one."""
        def together() -> list[Outcome]:
            summarizer, n = self._summarizer(), len(requests)
            calls = [(i, r) for i, r in enumerate(requests) if isinstance(r, Call)]
            answers = summarizer.run_calls([call for _, call in calls])
            out: dict[int, Outcome] = {i: _failed(a) if isinstance(a, BaseException) else self._done(a, n)
                                       for (i, _), a in zip(calls, answers)}
            return [out[i] if i in out else self._outcome(lambda r=r: summarizer.execute(r), n)
                    for i, r in enumerate(requests)]

        return self._many(together, [lambda r=r: self.execute(r) for r in requests])

    def evaluate(self, resolved: Resolved, cell: Cell, key: Key) -> Outcome:
        return self._outcome(lambda: self._cells(resolved, [(cell, key)])[0])

    def evaluate_many(self, resolved: Resolved, cells: list[tuple[Cell, Key]]) -> list[Outcome]:
        """Cells of one preset at once: the evaluation's own `compute`, which runs cells of one
        window as parallel sequences (as one process does with --parallel)."""
        n = len(cells)
        return self._many(lambda: [self._done(r, n) for r in self._cells(resolved, cells)],
                          [lambda c=c: self.evaluate(resolved, *c) for c in cells])

    def _cells(self, resolved: Resolved, cells: list[tuple[Cell, Key]]) -> list[dict[str, Any]]:
        """Each cell's result, in the order given (compute yields them in its own order)."""
        job = self.job
        assert isinstance(job, EvaluateJob)
        engine = self._engine(resolved)
        computed = job.evaluation.compute(engine, resolved, cells, lambda _: None)
        found = {id(cell): result for cell, _, result in computed}
        return [found[id(cell)] for cell, _ in cells]

    def _many(self, together: Callable[[], list[Outcome]], alone: list[Callable[[], Outcome]]) -> list[Outcome]:
        """`together`'s outcomes; if it raises (one bad item in a shared batch, a lost model), each
        item again on its own, so the error is the failing item's alone."""
        try:
            return together()
        except Exception:
            return [run() for run in alone]

    def pid(self) -> int:
        return os.getpid()


# --- Connecting ----------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ResourceError('--workers and --ray need Ray: pip install "localctx[ray]" '
                            '(or bash scripts/install.sh in a checkout).') from None
    return ray


def _check_reachable(address: str, timeout: float) -> None:
    """A cluster address that answers nothing is an error within `timeout`, not a long retry loop."""
    if address in ("local",):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ResourceError(f"Cannot reach a Ray cluster at {address}: {exc.strerror or exc}. Start one "
                            "(ray start --head) or check the address.") from None


@dataclass
class Session:
    """A Ray runtime to run on: one already started in this process (used as it is), a local one
    started for this batch, or an existing cluster joined for it (both left at the end)."""

    ray: Any
    started: bool
    workers: int
    threads: int

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


@contextmanager
def session(cluster: Cluster, threads: int | None) -> Iterator[Session]:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        import logging

        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if cluster.local:
            n = cluster.workers or 1
            each = threads or max(1, default_threads() // n)
            # address="local": never join $RAY_ADDRESS's cluster when a local runtime was asked for.
            ray.init(address="local", num_cpus=n * each, **quiet)
        else:
            address = cluster.resolved_address()
            _check_reachable(address, cluster.timeout)
            try:
                ray.init(address=address, **quiet)
            except Exception as exc:  # a port that is not Ray's, a version mismatch, a refused job
                raise ResourceError(f"Cannot join the Ray cluster at {address}: {exc}") from None
        started = True
    try:
        total = int(ray.cluster_resources().get("CPU", 0))
        each = threads or (max(1, total // cluster.workers) if cluster.workers else 1)
        n = cluster.workers or max(1, total // each)
        if n * each > total:
            raise ResourceError(f"{n} workers of {each} thread(s) need {n * each} CPUs, and the Ray runtime has "
                                f"{total}: ask for fewer --workers or --threads.")
        s = Session(ray, started, n, each)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    try:
        yield s
    finally:
        s.close()


# --- The pool ------------------------------------------------------------------------------------


@dataclass
class _Task:
    tag: Tag
    attempts: int = 0
    avoid: int | None = None  # the worker it died on


@dataclass
class _Call:
    """One actor call in flight: the worker (its slot) and the tasks it answers, in order."""

    slot: int
    tasks: list[_Task]


@dataclass
class Pool:
    """Workers and a queue: a task goes to an idle worker, its result comes back through
    `results`; a worker that dies is replaced and its tasks queued again for another one. With
    the job's `parallel` above 1, a worker is handed up to that many queued tasks of one kind in
    one actor call, which it runs as parallel sequences."""

    s: Session
    job: Job
    actors: list[Any] = field(default_factory=list)
    idle: deque[int] = field(default_factory=deque)
    queue: deque[_Task] = field(default_factory=deque)
    running: dict[Any, _Call] = field(default_factory=dict)  # by the Ray reference of its result
    retried: int = 0
    replaced: int = 0

    def __post_init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        self._remote = self.s.ray.remote(num_cpus=self.s.threads, max_restarts=0, max_task_retries=0)(Worker)
        self._env = env
        self.actors = [self._start(i) for i in range(self.s.workers)]
        self.idle = deque(range(self.s.workers))

    def _start(self, index: int) -> Any:
        return self._remote.remote(index, self.s.threads, self._env, self.job)

    def ready(self) -> None:
        """Every worker loads its model; the first error (a model a node cannot read, a preset that
        does not fit its memory, a prompt too long for the window) is raised here, once."""
        ray = self.s.ray
        try:
            outcomes = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:  # a worker that could not start or died loading
            raise ResourceError(f"A Ray worker failed to start: {type(exc).__name__}: {exc}") from None
        for outcome in outcomes:
            raise_error(outcome)

    def submit(self, tag: Tag) -> None:
        self.queue.append(_Task(tag))

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            # Tasks are shared out over the idle workers before any worker gets several: a batch
            # on one worker must not leave another idle.
            share = min(self.job.parallel, math.ceil(len(self.queue) / len(self.idle)))
            first = self.queue.popleft()
            slot = next((i for i in self.idle if i != first.avoid), self.idle[0])
            self.idle.remove(slot)
            tasks = [first] + self._take(first.tag.group, slot, share - 1)
            actor = self.actors[slot]
            if len(tasks) == 1:
                ref = first.tag.call(actor)
            else:
                ref = first.tag.call_many(actor, [t.tag for t in tasks])
            self.running[ref] = _Call(slot, tasks)

    def _take(self, group: Hashable | None, slot: int, n: int) -> list[_Task]:
        """Up to `n` queued tasks of `group` (in queue order) that did not die on worker `slot`."""
        if group is None or n <= 0:
            return []
        taken = []
        for task in list(self.queue):
            if len(taken) == n:
                break
            if task.tag.group == group and task.avoid != slot:
                taken.append(task)
                self.queue.remove(task)
        return taken

    def results(self, poll: float = 0.5) -> list[tuple[Tag, Outcome]]:
        """Wait for finished tasks (polling, so Ctrl-C is seen at once) and return their outcomes."""
        ray = self.s.ray
        while True:
            self._dispatch()
            if not self.running:
                return []
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=poll)
            if ready:
                break
        done: list[tuple[Tag, Outcome]] = []
        for ref in ready:
            call = self.running.pop(ref)
            try:
                got = ray.get(ref)
                outcomes: list[Outcome] = got if len(call.tasks) > 1 else [got]
            except ray.exceptions.RayTaskError as exc:  # the method itself raised (Worker catches errors)
                outcomes = [Failed("LocalctxError", str(exc))] * len(call.tasks)
            except ray.exceptions.RayError as exc:  # the worker process died: SIGKILL, OOM, ray.kill
                self._replace(call.slot)
                done += self._requeue(call, type(exc).__name__)
                continue
            self.idle.append(call.slot)
            done += [(task.tag, outcome) for task, outcome in zip(call.tasks, outcomes)]
        return done

    def _requeue(self, call: _Call, why: str) -> list[tuple[Tag, Outcome]]:
        """Each task of a call whose worker died goes back to the queue's front (in order), for
        another worker; a task that has lost MAX_ATTEMPTS workers is Died."""
        died: list[tuple[Tag, Outcome]] = []
        for task in reversed(call.tasks):
            task.attempts += 1
            if task.attempts >= MAX_ATTEMPTS:
                died.append((task.tag, Died(f"its worker died {task.attempts} times ({why})")))
            else:
                task.avoid = call.slot
                self.retried += 1
                self.queue.appendleft(task)
        return died[::-1]

    def _replace(self, slot: int) -> None:
        self.replaced += 1
        if self.replaced > 2 * len(self.actors) + 2:
            raise ResourceError(f"Workers keep dying ({self.replaced} so far): see `ray status` and the workers' "
                                "logs (out of memory?). Finished work is saved; run the same command to resume.")
        try:
            self.s.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._start(slot)
        self.idle.append(slot)

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.s.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self.running = [], {}


def raise_error(outcome: Outcome) -> None:
    """An error outcome raised as the error it was in the worker (a LocalctxError subclass)."""
    if isinstance(outcome, Failed):
        cls = getattr(errors, outcome.error, None)
        if not (isinstance(cls, type) and issubclass(cls, LocalctxError)):
            cls = LocalctxError
        raise cls(outcome.message)
    if isinstance(outcome, Died):
        raise ResourceError(f"A task failed: {outcome.message}.")


@contextmanager
def running_pool(cluster: Cluster, threads: int | None, job: Job) -> Iterator[Pool]:
    """A session and its pool; Ctrl-C stops the workers (and a runtime started here) and raises
    Interrupted: every finished result is already saved by the driver."""
    with session(cluster, threads) as s:
        pool = Pool(s, job)
        try:
            yield pool
        except KeyboardInterrupt:
            pool.stop()
            raise Interrupted() from None
        finally:
            pool.stop()


# --- Summarize -------------------------------------------------------------------------------------


@dataclass
class _DocRun:
    """One document in flight on the cluster: its flow and the answers of its current round."""

    doc: Document
    plan: Plan
    index: int
    flow: Flow
    calls: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    missing: int = 0
    done: bool = False


class _Driver:
    """Runs pending documents' flows over a pool; the store and the output are written here only."""

    def __init__(self, batch: _Batch, pool: Pool) -> None:
        self.batch, self.pool = batch, pool
        self.runs: dict[int, _DocRun] = {}
        self.tokens_done = 0
        self.work_tokens = 0  # prompt + generated tokens computed by the workers
        self.start = time.perf_counter()
        self.finished = 0

    def plan_all(self, pending: list[Document]) -> dict[int, Plan | str]:
        for i, doc in enumerate(pending):
            self.pool.submit(PlanTask(i, doc))
        plans: dict[int, Plan | str] = {}
        while self.pool.busy:
            for tag, outcome in self.pool.results():
                assert isinstance(tag, PlanTask)
                plans[tag.doc] = outcome.value if isinstance(outcome, Done) else outcome.message
        return plans

    def start_doc(self, run: _DocRun) -> None:
        r = self.batch.reporter
        r.doc_start(run.index, len(self.runs), run.doc.label, run.plan.strategy, run.plan.tokens, len(run.plan.chunks))
        self._advance(run, None)

    def _advance(self, run: _DocRun, answers: list[Any] | None) -> None:
        while True:
            try:
                requests = next(run.flow) if answers is None else run.flow.send(answers)
            except StopIteration as stop:
                # Its calls' own time (run here or before): on a cluster the wall time since the
                # document started would count the time its calls waited for a free worker.
                try:
                    result = document_result(run.plan, run.calls, stop.value, sum(c["seconds"] for c in run.calls))
                except LocalctxError as exc:
                    return self._fail(run, str(exc))
                return self._finish(run, result)
            except Exception as exc:
                return self._fail(run, error_message(exc))
            run.requests, run.answers, run.missing = requests, [None] * len(requests), 0
            for j, request in enumerate(requests):
                hit = self.batch.store.get_call(call_key(self.batch.fp, request.role, request.body)) \
                    if isinstance(request, Call) else None
                if hit is not None:
                    run.calls.append({**hit, "cached": True})
                    self._call_done(run, request, hit, cached=True)
                    run.answers[j] = hit["summary"]
                else:
                    run.missing += 1
                    self.pool.submit(RequestTask(run.index, j, request))
            if run.missing:
                return
            answers = run.answers

    def on_result(self, task: RequestTask, outcome: Outcome) -> None:
        run = self.runs[task.doc]
        request = task.request
        if not isinstance(outcome, Done):
            if not run.done:
                self._fail(run, outcome.message)
            return
        value = outcome.value
        if isinstance(request, Call):
            info = {**value, "worker": outcome.worker, "pid": outcome.pid, "batch": outcome.batch,
                    "n_seq": outcome.n_seq}
            self.batch.store.put_call(call_key(self.batch.fp, request.role, request.body), value)
            self.batch.stats.add(value)
            self.work_tokens += value["prompt_tokens"] + value["generated_tokens"]
            run.calls.append({**value, "cached": False})
            self._call_done(run, request, info, cached=False)
            value = value["summary"]
        if run.done:  # failed meanwhile: the call is stored (a re-run reuses it), the flow is over
            return
        run.answers[task.index] = value
        run.missing -= 1
        if run.missing == 0:
            self._advance(run, run.answers)

    def _call_done(self, run: _DocRun, call: Call, info: dict[str, Any], cached: bool) -> None:
        self.tokens_done += call.doc_tokens
        maps = sum(1 for c in run.calls if c["role"] == "map")
        self.batch.reporter.call_done({**info, "cached": cached, "label": run.doc.label, "map_index": maps,
                                       "chunks": len(run.plan.chunks)}, self.tokens_done)

    def _fail(self, run: _DocRun, message: str) -> None:
        self.batch.reporter.warn(f"{run.doc.label}: failed: {message}")
        self._finish(run, failed_result(run.plan, message))

    def _finish(self, run: _DocRun, result: dict[str, Any]) -> None:
        run.done = True
        self.batch.finish(run.doc, result)
        self.finished += 1
        self.batch.reporter.cluster_progress(self.finished, len(self.runs), self.work_tokens,
                                             time.perf_counter() - self.start, self.pool.s.workers)


def summarize_on_cluster(batch: _Batch, pending: list[Document], cluster: Cluster, resolved: Resolved) -> None:
    """The pending documents of a batch on Ray workers (see the module docstring)."""
    job = SummarizeJob(resolved, batch.options, batch.fp)
    with running_pool(cluster, resolved.spec.threads, job) as pool:
        pool.ready()
        batch.stats.workers = pool.s.workers
        driver = _Driver(batch, pool)
        first: dict[str, int] = {}  # a document's key → its first pending index: duplicates wait for it
        unique = []
        for i, doc in enumerate(pending):
            if first.setdefault(batch._key(doc), i) == i:
                unique.append(doc)
        plans = driver.plan_all(unique)
        good = [p for p in plans.values() if not isinstance(p, str)]
        batch.reporter.batch_start(len(batch.order), len(batch.records), sum(p.tokens for p in good),
                                   sum(len(p.chunks) for p in good))
        for i, doc in enumerate(unique, 1):
            plan = plans[i - 1]
            if isinstance(plan, str):
                batch.reporter.warn(f"{doc.label}: failed: {plan}")
                batch.finish(doc, failed_result(None, plan))
                continue
            driver.runs[i] = _DocRun(doc, plan, i, summary_flow(plan))
        for run in list(driver.runs.values()):
            driver.start_doc(run)
        while pool.busy:
            for tag, outcome in pool.results():
                assert isinstance(tag, RequestTask)
                driver.on_result(tag, outcome)
        batch.stats.retried = pool.retried
    ran = {id(doc) for doc in unique}
    for doc in pending:  # a duplicate's record is its twin's, as in one process
        if id(doc) not in ran:
            batch.emit_stored(doc)


# --- Evaluate --------------------------------------------------------------------------------------


def evaluate_on_cluster(evaluation: Evaluation, todo: CellTodo, cluster: Cluster, threads: int | None,
                        on_found: CellFound) -> None:
    """Every cell of `todo` (grouped by preset) on Ray workers; `on_found` (the driver: the cache and
    the result) sees each as it finishes. With the evaluation's `parallel` above 1 a worker gets up
    to that many cells of one preset at once. A cell whose worker died twice is not cached; the
    error names it after the rest."""
    failed = []
    job = EvaluateJob(evaluation, evaluation.parallel)
    with running_pool(cluster, threads, job) as pool:
        i = 0
        for p, (resolved, cells) in enumerate(todo):
            for cell, key in cells:
                pool.submit(CellTask(i, p, resolved, cell, key))
                i += 1
        while pool.busy:
            for tag, outcome in pool.results():
                assert isinstance(tag, CellTask)
                if isinstance(outcome, Done):
                    on_found(tag.cell, tag.key, outcome.value)
                elif isinstance(outcome, Failed):
                    pool.stop()
                    raise_error(outcome)  # as in one process: a bad cell stops the run
                else:
                    failed.append(f"{tag.cell['preset']} {tag.cell['length']:,}: {outcome.message}")
    if failed:
        raise ResourceError(f"{len(failed)} cell(s) failed: {'; '.join(failed)}. The other cells are cached: "
                            "run the same command again to compute the rest.")


# --- The executor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayExecutor:
    """localctx.executor.Executor on the Ray workers of `cluster`: the API and the commands build
    it for workers= / --workers or a Ray address, and summarize and evaluate run through it."""

    cluster: Cluster

    def summarize(self, batch: _Batch, pending: list[Document], resolved: Resolved) -> None:
        summarize_on_cluster(batch, pending, self.cluster, resolved)

    def evaluate(self, evaluation: Evaluation, todo: CellTodo, found: CellFound, progress: Progress,
                 engine_factory: Callable[[Resolved], Any]) -> None:
        """Every cell on the workers; `engine_factory` is this process's, and unused: workers open their own."""
        progress(f"computing {sum(len(cells) for _, cells in todo)} cell(s) on Ray workers")
        evaluate_on_cluster(evaluation, todo, self.cluster, todo[0][0].spec.threads, found)
