"""Progress for `localctx summarize` on stderr: a rich display on a terminal, plain lines otherwise
(logs, CI, pipes). Both show documents, chunks, tokens/s and an ETA."""
from __future__ import annotations

import sys
import time
from typing import IO, Any

from .summarize import BatchStats, Reporter


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


class _Clock:
    """ETA from document tokens done against those left, at this run's observed rate."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.total_tokens = 0
        self.done_tokens = 0

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if not self.done_tokens or elapsed <= 0:
            return "?"
        rate = self.done_tokens / elapsed
        return duration(max(0, self.total_tokens - self.done_tokens) / rate)


def _summary_line(stats: BatchStats) -> str:
    parts = [f"{stats.summarized} summarized", f"{stats.cached} already done", f"{stats.failed} failed"]
    if stats.skipped:
        parts.append(f"{stats.skipped} skipped")
    where = ""
    if stats.workers:
        retried = f", {stats.retried} task(s) retried after a worker died" if stats.retried else ""
        where = f" on {stats.workers} workers{retried}"
    return (f"{stats.documents} documents: {', '.join(parts)}; {stats.model_calls} model calls "
            f"({stats.prompt_tokens:,} prompt + {stats.generated_tokens:,} generated tokens) "
            f"in {duration(stats.seconds)}{where}.")


def _call_line(info: dict[str, Any], index: int, chunks: int) -> str:
    # On a cluster calls of several documents interleave: each names its document and worker.
    index, chunks = info.get("map_index", index), info.get("chunks", chunks)
    what = "reduce" if info["role"] == "reduce" else "one pass" if chunks == 1 else f"map {index}/{chunks}"
    if "label" in info:
        what = f"{info['label']}: {what}"
    if info["cached"]:
        return f"  {what}: already done"
    tokens = info["prompt_tokens"] + info["generated_tokens"]
    rate = tokens / info["seconds"] if info["seconds"] else 0.0
    restored = f", {info['restored_tokens']:,} of them from a KV snapshot" if info.get("restored_tokens") else ""
    worker = f" on worker {info['worker']}" if "worker" in info else ""
    return (f"  {what}: {info['prompt_tokens']:,} prompt{restored} + {info['generated_tokens']:,} generated tokens "
            f"in {info['seconds']:.1f}s ({rate:,.0f} tok/s){worker}")


def _cluster_line(done: int, total: int, tokens: int, seconds: float, workers: int) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    return (f"{done}/{total} documents done; {tokens:,} tokens at {rate:,.0f} tok/s across {workers} "
            f"worker{'s' if workers != 1 else ''}")


class PlainReporter(Reporter):
    """One line per event, flushed at once, so `tail -f` on a log shows where a batch is."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.clock = _Clock()
        self.chunks = 0
        self.maps = 0

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def batch_start(self, documents: int, done: int, pending_tokens: int, pending_chunks: int) -> None:
        self.clock = _Clock()
        self.clock.total_tokens = pending_tokens
        self._print(f"{documents} documents, {done} already done or skipped; {pending_tokens:,} tokens in "
                    f"{pending_chunks} chunks to summarize.")

    def doc_start(self, index: int, total: int, label: str, strategy: str, tokens: int, chunks: int) -> None:
        self.chunks, self.maps = chunks, 0
        detail = f"{chunks} chunks" if strategy == "map-reduce" else "one pass"
        self._print(f"[{index}/{total}] {label}: {tokens:,} tokens, {strategy} ({detail})")

    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        self.clock.done_tokens = doc_tokens_done
        if info["role"] == "map":
            self.maps += 1
        self._print(f"{_call_line(info, self.maps, self.chunks)} · ETA {self.clock.eta()}")

    def doc_done(self, record: dict[str, Any], cached: bool) -> None:
        if record["status"] == "ok":
            how = "already done" if cached else f"done in {duration(record['seconds'])}"
            self._print(f"{record['path']}: {how} ({record['strategy']}, {record['model_calls']} model calls)")
        elif cached and record["status"] == "failed":
            self._print(f"{record['path']}: failed before ({record['error']}); --retry-failed retries it")

    def warn(self, message: str) -> None:
        self._print(f"warning: {message}")

    def cluster_progress(self, done: int, total: int, tokens: int, seconds: float, workers: int) -> None:
        self._print(_cluster_line(done, total, tokens, seconds, workers))

    def batch_done(self, stats: BatchStats) -> None:
        self._print(_summary_line(stats))


class QuietReporter(Reporter):
    """--quiet: no progress, but skipped and failed documents are still named."""

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class RichReporter(PlainReporter):
    """A live progress display; event lines print above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        super().__init__()
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.docs_task = self.progress.add_task("documents", total=None, rate="")
        self.tokens_task = self.progress.add_task("tokens", total=None, rate="")

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)

    def batch_start(self, documents: int, done: int, pending_tokens: int, pending_chunks: int) -> None:
        super().batch_start(documents, done, pending_tokens, pending_chunks)
        self.progress.update(self.docs_task, total=documents, completed=done)
        self.progress.update(self.tokens_task, total=pending_tokens, completed=0)
        self.progress.start()

    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        super().call_done(info, doc_tokens_done)
        rate = ""
        if not info["cached"] and info["seconds"]:
            rate = f"{(info['prompt_tokens'] + info['generated_tokens']) / info['seconds']:,.0f} tok/s"
        self.progress.update(self.tokens_task, completed=doc_tokens_done, rate=rate)

    def doc_done(self, record: dict[str, Any], cached: bool) -> None:
        super().doc_done(record, cached)
        self.progress.advance(self.docs_task)

    def cluster_progress(self, done: int, total: int, tokens: int, seconds: float, workers: int) -> None:
        rate = tokens / seconds if seconds > 0 else 0.0
        self.progress.update(self.docs_task, rate=f"{rate:,.0f} tok/s on {workers} workers")

    def batch_done(self, stats: BatchStats) -> None:
        self.progress.stop()
        super().batch_done(stats)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(quiet: bool, stream: IO[str] | None = None) -> Reporter:
    stream = stream or sys.stderr
    if quiet:
        return QuietReporter()
    return RichReporter() if stream.isatty() else PlainReporter(stream)
