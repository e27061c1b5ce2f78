"""Sequences of one llama.cpp context, and the scheduler that runs many at once.

A Slot is one sequence id: the tokens its KV cells hold, in order, and their positions. A Run is a
completion in progress on a slot. `Scheduler.step` is one round of continuous batching: a single
llama_decode carries the next token of every generating run and, in what room is left, prefill
chunks of runs that may share a batch; runs whose answers must not depend on what ran beside them
(summarize, eval: `mixed=False`) have their prefill decoded alone, in the chunks a run alone would
use, and only their generated tokens share a batch, where an exact context gives each row what it
gets alone (see docs/architecture.md)."""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import Cancelled, LocalctxError
from ..gguf_meta import ModelFacts
from ..params import RuntimeParams
from .backend import Batch, Context, Sampler
from .logprobs import TokenLogprob, token_logprob
from .positions import Positions



@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    # KV snapshots (part of prompt_seconds): tokens restored from one instead of evaluated, the
    # tokens of the one saved, and the time finding, loading or saving took.
    restored_tokens: int = 0
    saved_tokens: int = 0
    snapshot_seconds: float = 0.0
    snapshot_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens the sequence's KV cells already held (not evaluated again)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_seconds": round(self.prompt_seconds, 3),
            "prompt_tokens_per_second": round(self.prompt_tps, 1),
            "generated_tokens": self.generated_tokens,
            "generation_seconds": round(self.generation_seconds, 3),
            "generation_tokens_per_second": round(self.generation_tps, 1),
            "restored_tokens": self.restored_tokens,
            "saved_tokens": self.saved_tokens,
            "snapshot_seconds": round(self.snapshot_seconds, 3),
            "snapshot_bytes": self.snapshot_bytes,
        }


@dataclass
class Generation:
    """A streamed completion; `text` and `timings` fill in as the stream is consumed."""

    chunks: Iterator[str]
    timings: Timings = field(default_factory=Timings)
    text: str = ""
    finish_reason: str = ""
    window: int = 0  # the tokens of the window it ran at (auto: its step's)
    params: RuntimeParams | None = None  # the parameters of that window

    def __iter__(self) -> Iterator[str]:
        return self.chunks

    def finish(self) -> Generation:
        """Consume whatever is left of the stream; `text`, `timings` and `finish_reason` are then final."""
        for _ in self.chunks:
            pass
        return self


class Slot:
    """One sequence of a context: what its KV cells hold, and where."""

    def __init__(self, ctx: Context, seq: int, facts: ModelFacts) -> None:
        self.ctx, self.seq, self.facts = ctx, seq, facts
        self.tokens: list[int] = []
        self.positions = Positions(ctx.params)

    def clear(self) -> None:
        self.ctx.clear(self.seq)
        self.tokens = []
        self.positions.reset()

    def held(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the KV cells hold already (from this slot's last use)."""
        m = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            m += 1
        # The caller evaluates at least the last prompt token again, so going on from m - 1 must work.
        return m if self.resumable(m - 1) else 0

    def resumable(self, n: int) -> bool:
        """Whether evaluation can go on after the first `n` cached tokens. A window-sized
        sliding-window cache (swa_full off) drops the tokens its layers no longer see; going back
        further than it still holds needs the prompt again (or its snapshot)."""
        w = self.facts.sliding_window
        if n <= 0 or not w or self.ctx.params.swa_full:
            return True
        oldest = self.ctx.pos_min(self.seq)
        # The token at position n sees back to n - w + 1 (a chunked window: to its chunk's start).
        first_seen = (n // w) * w if self.facts.sliding_kind == "chunked" else n - w + 1
        return oldest <= max(0, first_seen)

    def cut(self, n: int, tokens: list[int]) -> tuple[list[int], int]:
        """Keep the first `n` cached tokens and drop the rest, before `tokens` are evaluated after
        them; returns what to evaluate and from which index. Where the cut cannot be made (among
        grouped positions, or before what a sliding cache still holds) it starts over."""
        if 0 < n < self.positions.grouped or not self.resumable(n):
            tokens, n = self.tokens[:n] + tokens, 0
        if n == 0:
            self.clear()
        else:
            self.ctx.seq_rm(self.seq, self.positions.at(n), -1)
            del self.tokens[n:]
        return tokens, n

    def stage(self, batch: Batch, chunk: Sequence[int], wanted: Callable[[int], bool]) -> int:
        """Put `chunk`, the tokens after the slot's, into `batch` at their positions (logits for the
        wanted indices); returns the row of its first token. They join `tokens` once decoded."""
        first = len(self.tokens)
        self.positions.before(self.ctx, self.seq, first, len(chunk))
        row = batch.n
        for j, tok in enumerate(chunk):
            batch.add(tok, self.positions.at(first + j), self.seq, wanted(first + j))
        return row

    def decode(self, tokens: Sequence[int], wanted: Callable[[int], bool] = lambda i: False,
               take: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> None:
        """Evaluate `tokens` after the slot's tokens, alone in each batch, in the chunks a run
        alone uses; `take(index, row)` for each wanted index once its batch is decoded."""
        ctx, batch = self.ctx, self.ctx.batch
        step = self.positions.chunk_limit(ctx.params.n_batch)
        tokens = list(tokens)
        for offset in range(0, len(tokens), step):
            if should_stop is not None and should_stop():
                raise Cancelled("The request was cancelled.")
            chunk = tokens[offset : offset + step]
            first = len(self.tokens)
            batch.clear()
            self.stage(batch, chunk, wanted)
            ctx.decode(batch)
            self.tokens += chunk
            if take is not None:
                for j in range(len(chunk)):
                    if wanted(first + j):
                        take(first + j, j)

    def extend(self, n: int, tokens: list[int], should_stop: Callable[[], bool] | None = None) -> None:
        """Evaluate `tokens` after the first `n` cached tokens (dropping the rest), alone."""
        tokens, n = self.cut(n, tokens)
        self.decode(tokens, should_stop=should_stop)

    def fixed_head(self, tokens: list[int], end: int, should_stop: Callable[[], bool] | None = None) -> int:
        """Bring `tokens[:end]` into the slot as one piece evaluated alone from the first token
        (kept when the slot holds it so, and can go on after it); returns where the rest starts.
        A fixed split makes the answer independent of the slot's history: llama.cpp's CPU
        flash-attention kernels give different logits for different batch splits."""
        end = min(end, len(tokens) - 1)
        if end <= 0:
            return 0
        if self.held(tokens) >= end and self.positions.grouped <= end and self.resumable(end):
            return end
        self.extend(0, tokens[:end], should_stop)
        return end


@dataclass
class Stops:
    """Text withheld while it could be the start of a stop string."""

    stops: list[str]
    held: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        emit, self.held, stopped = split_stop(self.held + text, self.stops)
        return emit, stopped


class Run:
    """A completion on a slot: its prompt still to evaluate, its sampler and its text."""

    def __init__(self, slot: Slot, pending: list[int], sampler: Sampler, *, max_tokens: int,
                 stop: Sequence[str], is_eog: Callable[[int], bool], piece: Callable[[int], bytes],
                 gen: Generation, mixed: bool, should_stop: Callable[[], bool] | None = None,
                 logprobs: int | None = None) -> None:
        self.slot, self.sampler, self.gen = slot, sampler, gen
        # logprobs: record each generated token's log-probability and this many alternatives
        # (None: none are computed); `picks` holds them until drained, as `out` the text.
        self.logprobs = logprobs
        self.picks: list[TokenLogprob] = []
        self.pending = pending  # prompt tokens still to evaluate (at least the last, for its logits)
        self.max_tokens, self.is_eog, self.piece = max_tokens, is_eog, piece
        self.stops = Stops(list(stop))
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.mixed, self.should_stop = mixed, should_stop
        self.out: list[str] = []
        self.done = False
        self.error: BaseException | None = None
        self.last: int | None = None  # the token sampled last, to evaluate next
        self.started = time.perf_counter()
        self.first: float | None = None
        gen.finish_reason = "length"
        if not pending:
            raise LocalctxError("A run needs at least its last prompt token to evaluate.")

    def drain(self) -> list[str]:
        out, self.out = self.out, []
        return out

    def drain_logprobs(self) -> list[TokenLogprob]:
        picks, self.picks = self.picks, []
        return picks

    def sample(self, ctx: Context, row: int) -> int:
        """Draw the next token from the batch's `row`, with its log-probability when asked (read
        here, before the next decode overwrites the row)."""
        token = self.sampler.sample(ctx, row)
        if self.logprobs is not None and not self.is_eog(token):
            self.picks.append(token_logprob(ctx.logits(row), ctx.model.n_vocab, token, self.logprobs))
        return token

    def cancelled(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def accept(self, token: int) -> None:
        """A sampled token: emit its text, or end the run."""
        t = self.gen.timings
        if self.first is None:
            self.first = time.perf_counter()
            t.prompt_seconds = self.first - self.started
        if self.is_eog(token):
            self.gen.finish_reason = "stop"
            return self.end()
        t.generated_tokens += 1
        emit, stopped = self.stops.feed(self.decoder.decode(self.piece(token)))
        if emit:
            self.gen.text += emit
            self.out.append(emit)
        if stopped:
            self.gen.finish_reason = "stop"
            return self.end(flush=False)
        if t.generated_tokens >= self.max_tokens:
            return self.end()
        self.last = token

    def end(self, flush: bool = True, error: BaseException | None = None) -> None:
        if self.done:
            return
        if flush and error is None:
            tail = self.stops.held + self.decoder.decode(b"", final=True)
            if tail:
                self.gen.text += tail
                self.out.append(tail)
        now = time.perf_counter()
        t = self.gen.timings
        if self.first is None:
            t.prompt_seconds = now - self.started
        else:
            # The first token's sampling is part of prompt processing; the rest is generation.
            t.generation_seconds = now - self.first
        self.done, self.error, self.last = True, error, None
        self.sampler.close()


class Scheduler:
    """Steps the runs of one context together: one llama_decode per step for every generating
    run's token and the prefill chunks that may share it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.runs: list[Run] = []  # in progress, and finished ones until the next step

    def add(self, run: Run) -> None:
        self.runs.append(run)

    @property
    def active(self) -> list[Run]:
        return [r for r in self.runs if not r.done]

    def step(self) -> None:
        """One round; finished runs leave `runs` (their slots are then free)."""
        for run in self.runs:
            if not run.done and run.cancelled():
                run.end(error=Cancelled("The request was cancelled."))
        live = [r for r in self.runs if not r.done]
        for run in live:  # runs that must not share a batch while they prefill: their chunks alone
            if run.pending and not run.mixed:
                self._decode([], [run])
        live = [r for r in live if not r.done]
        generating = [r for r in live if r.last is not None and not r.pending]
        # Generated tokens of runs whose answers must not depend on their neighbours share a batch
        # of their own: in an exact context each row then gets the logits it gets alone
        # (backend.Context); mixed runs share one with prefill chunks.
        self._decode([r for r in generating if not r.mixed], [])
        self._decode([r for r in generating if r.mixed], [r for r in live if r.pending and r.mixed])
        self.runs = [r for r in self.runs if not r.done]

    def _decode(self, generating: list[Run], prefilling: list[Run]) -> None:
        """One llama_decode: each generating run's next token, then prefill chunks in the room left;
        a run whose prompt ends in this batch samples its first token."""
        batch = self.ctx.batch
        batch.clear()
        staged: list[tuple[Run, list[int]]] = []
        sample: list[tuple[Run, int]] = []  # a run and the row its next token comes from
        for run in generating:
            token, run.last = run.last, None
            sample.append((run, run.slot.stage(batch, [token], lambda i: True)))
            staged.append((run, [token]))
        room = self.ctx.params.n_batch - batch.n
        for run in prefilling:
            if room <= 0:
                break
            take = min(room, run.slot.positions.chunk_limit(self.ctx.params.n_batch), len(run.pending))
            chunk, run.pending = run.pending[:take], run.pending[take:]
            end = len(run.slot.tokens) + take - 1  # the index of the chunk's last token
            row = run.slot.stage(batch, chunk, lambda i, last=not run.pending, end=end: last and i == end)
            staged.append((run, chunk))
            if not run.pending:
                sample.append((run, row + take - 1))
            room -= take
        if not batch.n:
            return
        try:
            self.ctx.decode(batch)
        except LocalctxError as exc:
            for run, _ in staged:
                run.end(error=exc)
            return
        for run, chunk in staged:
            run.slot.tokens += chunk
        for run, row in sample:
            try:
                run.accept(run.sample(self.ctx, row))
            except LocalctxError as exc:
                run.end(error=exc)


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split streamed text into (safe to emit, withheld, stopped)."""
    if not stops:
        return text, "", False
    for s in stops:
        at = text.find(s)
        if at >= 0:
            return text[:at], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False
