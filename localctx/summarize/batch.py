"""The batch driver: finished work from the store, the rest run here (one document at a time, or
several as parallel sequences) or handed to an executor; the one writer of the store and the output."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, LocalctxError
from ..executor import Executor, LocalExecutor
from ..fsutil import atomic_write, check_output_dir
from ..paths import cache_dir, writable_cache
from ..runtime import Resolved, RunSpec, resolve_spec
from ..summary_store import JSONL_NAME, Store, markdown, write_jsonl
from .flow import Flow, Plan, Request, _raise_failed, document_result, error_message, failed_result, summary_flow
from .inputs import expand_inputs, output_paths, read_documents, resolved_inside
from .options import BatchResult, BatchStats, Document, Reporter, SummarizeOptions, document_key, fingerprint
from .summarizer import Summarizer

def store_dir() -> Path:
    return cache_dir() / "summarize"


def summarize_batch(inputs: Sequence[str], spec: RunSpec | Resolved, options: SummarizeOptions, *,
                    out: Path | None = None, stdin: IO[bytes] | None = None, reporter: Reporter | None = None,
                    on_record: Callable[[dict[str, Any]], None] | None = None, engine: Any = None,
                    store: Store | None = None, executor: Executor | None = None) -> BatchResult:
    """Summarize every input; finished work comes from the store, the rest runs on `engine` when
    given, else where `executor` runs it (this process by default, or Ray workers) while this
    process alone writes the store and the output. Records come back in input order; `on_record`
    sees each as soon as it is final. With `out`, Markdown files and summaries.jsonl are kept up to date."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    if engine is not None and executor is not None:
        raise InputError("An open engine runs in this process: pass either engine or workers (an executor), not both.")
    if out is not None:
        check_output_dir(out, "--out")
    sources = expand_inputs(inputs, exclude=out)
    targets = output_paths(out, sources) if out is not None else {}
    docs, skipped = read_documents(sources, stdin, reporter.warn)
    if not docs:
        raise InputError(f"No readable files among {', '.join(inputs)}: " + "; ".join(r["error"] for r in skipped))
    if engine is not None:
        facts, params, ladder = engine.facts, engine.params, engine.ladder
    else:  # resolved once: the engine is opened with the same Resolved
        resolved = spec if isinstance(spec, Resolved) else resolve_spec(spec)
        facts, params, ladder = resolved.facts, resolved.params, resolved.ladder
    fp = fingerprint(facts, ladder, options)
    store = store or Store(writable_cache(store_dir(), "summarizer's store"))
    batch = _Batch(docs, skipped, [s.label for s in sources], options, fp, store, reporter, on_record, out,
                   targets, {"model": facts.path.name, "preset": params.preset})
    if engine is not None:
        batch.run_on(lambda pending: batch.run_here(engine, pending, close=False))
    else:
        batch.run_on(lambda pending: (executor or LocalExecutor()).summarize(batch, pending, resolved))
    batch.stats.seconds = time.perf_counter() - started
    reporter.batch_done(batch.stats)
    return BatchResult(batch.ordered_records(), batch.stats, batch.out_files)


@dataclass
class _Active:
    """A document whose flow is in progress beside others (`_Batch._run_together`)."""

    doc: Document
    plan: Plan
    flow: Flow
    requests: list[Request]
    key: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False


class _Batch:
    def __init__(self, docs: list[Document], skipped: list[dict[str, Any]], order: list[str],
                 options: SummarizeOptions, fp: str,
                 store: Store, reporter: Reporter, on_record: Callable[[dict[str, Any]], None] | None,
                 out: Path | None, targets: dict[str, Path], meta: dict[str, str]) -> None:
        self.docs, self.options, self.fp, self.store = docs, options, fp, store
        self.reporter, self.on_record, self.out, self.meta = reporter, on_record, out, meta
        self.targets = targets  # label → output file, proven inside `out` (output_paths)
        self.records: dict[str, dict[str, Any]] = {r["path"]: r for r in skipped}
        self.order = order
        self.stats = BatchStats(documents=len(docs) + len(skipped), skipped=len(skipped))
        self.out_files: list[Path] = []

    def _key(self, doc: Document) -> str:
        return document_key(self.fp, self.options, doc.sha256)

    def _finished(self, doc: Document) -> dict[str, Any] | None:
        record = self.store.get_document(self._key(doc))
        if record is None or (record["status"] == "failed" and self.options.retry_failed):
            return None
        return record

    def run_on(self, run_pending: Callable[[list[Document]], None]) -> None:
        """Emit what is finished, then hand the rest to `run_pending` (nothing: no model, no workers)."""
        for record in self.records.values():  # the skipped ones
            if self.on_record:
                self.on_record(record)
        pending = []
        for doc in self.docs:
            record = self._finished(doc)
            if record is None:
                pending.append(doc)
            else:
                self._emit(doc, record, cached=True)
        self._write_jsonl()
        if not pending:
            return  # everything is done: the model is not even loaded
        self.stats.model_loaded = True
        run_pending(pending)

    def run_here(self, engine: Any, pending: list[Document], close: bool) -> None:
        try:
            self._run_pending(engine, pending)
        finally:
            if close:
                engine.close()

    def _run_pending(self, engine: Any, pending: list[Document]) -> None:
        summarizer = Summarizer(engine, self.store, self.options, self.fp, self.reporter)
        plans = [self._plan(summarizer, doc) for doc in pending]
        self.reporter.batch_start(len(self.order), len(self.records),
                                  sum(p.tokens for p in plans if p), sum(len(p.chunks) for p in plans if p))
        try:
            if getattr(engine, "n_seq", 1) > 1:
                self._run_together(summarizer, pending, plans)
                return
            for i, (doc, plan) in enumerate(zip(pending, plans), 1):
                if not self._done_already(doc):
                    self._run_one(summarizer, doc, plan, i, len(pending))
        finally:
            self.stats.merge(summarizer.stats)

    def _done_already(self, doc: Document) -> bool:
        record = self._finished(doc)  # a duplicate earlier in this batch may have done it
        if record is not None:
            self._emit(doc, record, cached=True)
            self._write_jsonl()
        return record is not None

    def _run_together(self, summarizer: Summarizer, pending: list[Document], plans: list[Plan | None]) -> None:
        """Several documents at once: every round of every active document's flow (its map
        chunks, or its one pass) is answered together, as parallel sequences of the engine, and a
        finished document makes room for the next. Each call's answer is what it would be alone."""
        queue = list(enumerate(zip(pending, plans), 1))
        active: list[_Active] = []
        while queue or active:
            while queue and len(active) < summarizer.engine.n_seq:
                i, (doc, plan) = queue[0]
                if any(a.key == self._key(doc) for a in active):
                    break  # the same content in flight: its duplicate waits for its record
                queue.pop(0)
                if not self._done_already(doc):
                    started = self._start_flow(summarizer, doc, plan, i, len(pending))
                    if started is not None:
                        active.append(started)
            if not active:
                continue
            rounds = [(a, r) for a in active for r in a.requests]
            answers = summarizer.answer([(r, a.calls) for a, r in rounds])
            for a in active:
                mine = [ans for (owner, _), ans in zip(rounds, answers) if owner is a]
                self._advance_flow(a, mine)
            active = [a for a in active if not a.finished]

    def _start_flow(self, summarizer: Summarizer, doc: Document, plan: Plan | None, i: int, n: int) -> _Active | None:
        try:
            plan = plan or summarizer.plan(doc)
            summarizer.reporter.doc_start(i, n, doc.label, plan.strategy, plan.tokens, len(plan.chunks))
            flow = summary_flow(plan)
            return _Active(doc, plan, flow, next(flow), self._key(doc))
        except Exception as exc:  # one bad document must not stop the batch; the reason is recorded
            self._fail(doc, plan, exc)
            return None

    def _advance_flow(self, a: _Active, answers: list[Any]) -> None:
        try:
            a.requests = a.flow.send(_raise_failed(answers))
        except StopIteration as stop:
            reused = sum(c["seconds"] for c in a.calls if c["cached"])
            seconds = time.perf_counter() - a.started + reused
            a.finished = True
            try:
                self.finish(a.doc, document_result(a.plan, a.calls, stop.value, seconds))
            except Exception as exc:
                self._fail(a.doc, a.plan, exc)
        except Exception as exc:
            a.finished = True
            self._fail(a.doc, a.plan, exc)

    def _fail(self, doc: Document, plan: Plan | None, exc: BaseException) -> None:
        message = error_message(exc)
        self.reporter.warn(f"{doc.label}: failed: {message}")
        self.finish(doc, failed_result(plan, message))

    def _plan(self, summarizer: Summarizer, doc: Document) -> Plan | None:
        try:
            return summarizer.plan(doc)
        except LocalctxError:
            return None  # reported when the document's turn comes

    def _run_one(self, summarizer: Summarizer, doc: Document, plan: Plan | None, i: int, n: int) -> None:
        try:
            plan = plan or summarizer.plan(doc)
            result = summarizer.summarize(doc, plan, i, n)
        except Exception as exc:  # one bad document must not stop the batch; the reason is recorded
            self._fail(doc, plan, exc)
            return
        self.finish(doc, result)

    def finish(self, doc: Document, result: dict[str, Any]) -> None:
        """Store a document's final record and emit it (the one writer: one process or a cluster's driver)."""
        record = {"path": doc.label, "sha256": doc.sha256, **self.meta, **result}
        self.store.put_document(self._key(doc), record)
        self._emit(doc, record, cached=False)
        self._write_jsonl()

    def emit_stored(self, doc: Document) -> None:
        """A document whose record another path of the same content just stored."""
        record = self.store.get_document(self._key(doc))
        if record is not None:
            self._emit(doc, record, cached=True)
            self._write_jsonl()

    def _emit(self, doc: Document, stored: dict[str, Any], cached: bool) -> None:
        record = {**stored, "path": doc.label}  # the same content may sit at another path
        if record["status"] == "failed":
            self.stats.failed += 1
        elif cached:
            self.stats.cached += 1
        else:
            self.stats.summarized += 1
        self.records[doc.label] = record
        if self.out is not None and record["status"] == "ok":
            target = self.targets[doc.label]
            resolved_inside(self.out, target)  # again: a link swapped into OUT since the start must not lead out
            self._write(target, lambda: atomic_write(target, markdown(record)))
            self.out_files.append(target)
        self.reporter.doc_done(record, cached)
        if self.on_record:
            self.on_record(record)

    def _write_jsonl(self) -> None:
        if self.out is not None:
            self._write(self.out / JSONL_NAME, lambda: write_jsonl(self.out, self.ordered_records()))

    @staticmethod
    def _write(target: Path, write: Callable[[], Any]) -> None:
        try:
            write()
        except OSError as exc:  # full disk, a directory in the way, permissions changed mid-batch
            raise LocalctxError(f"Cannot write {target}: {exc.strerror or exc}. Finished documents are saved "
                                "in the cache; fix the output and run the same command again.") from None

    def ordered_records(self) -> list[dict[str, Any]]:
        return [self.records[p] for p in dict.fromkeys(self.order) if p in self.records]
