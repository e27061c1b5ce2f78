"""The Engine: a model loaded at a resolved ladder of windows, with N sequences per context.
Open one with `localctx.open_model` (or `runtime.open_engine`); close it, or use `with`.

An engine opened with `auto` is adaptive: its `ladder` holds several windows, and each request
runs at the smallest that holds it (`params` and `n_ctx` are those used last). Sequences at the
same step share a context (a lane); a request for another step gets a lane of its own beside the
running ones while memory allows, else waits (engine.windows)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ContextOverflowError, LocalctxError
from ..gguf_meta import ModelFacts
from ..kvcache import KVStore, SnapshotKey
from ..memory import SCORE, Workload
from ..params import RuntimeParams
from ..presets import Ladder
from .backend import DEFAULT_SEED, Model, Sampler, llama_arguments, set_llama_log
from .scoring import score_many
from .sequences import Generation, Run, Scheduler, Slot
from .snapshots import Snapshots
from .tokens import TextMethods, Tokenizer
from .windows import Lane, Switch, Windows


class Engine(TextMethods):
    """Generate (one sequence or many at once), logits; tokens and chat templates (TextMethods)."""

    def __init__(self, model: Model, facts: ModelFacts, ladder: Ladder, *, gpu_layers: int, threads: int | None,
                 workload: Workload = SCORE, kv_store: KVStore | None = None, seed: int = 0, verbose: bool = False,
                 overflow_hint: Callable[[int], str] | None = None) -> None:
        self.model, self.facts, self.ladder = model, facts, ladder
        self.gpu_layers, self.threads, self.n_seq, self.verbose = gpu_layers, threads, workload.n_seq, verbose
        self.overflow_hint = overflow_hint  # what to suggest when a prompt does not fit
        self.n_vocab = model.n_vocab
        self.tokenizer = Tokenizer(model, facts)
        self.snapshots = Snapshots(facts, kv_store)
        self._seed = seed or DEFAULT_SEED  # 0: a random seed per call, as llama-cpp-python
        # The workload's sequences per context, and whether results must not depend on threads and
        # batch composition (exact: backend.Context); the lanes are budgeted as memory planned it.
        self.windows = Windows(model, facts, ladder, workload, threads=threads)

    @classmethod
    def load(cls, facts: ModelFacts, params: RuntimeParams | Ladder, *, gpu_layers: int = 0,
             threads: int | None = None, verbose: bool = False, seed: int = 0, workload: Workload = SCORE,
             kv_store: KVStore | None = None, overflow_hint: Callable[[int], str] | None = None) -> Engine:
        """Load the model as given: no policy here (runtime.open_engine checks memory first)."""
        ladder = params if isinstance(params, Ladder) else Ladder((params,))
        set_llama_log(verbose)
        try:
            model = Model(str(facts.path), gpu_layers)
        except ValueError as exc:
            raise LocalctxError(f"llama.cpp could not load {facts.path} ({exc}). "
                                "Run again with --verbose to see llama.cpp's own log.") from None
        try:
            engine = cls(model, facts, ladder, gpu_layers=gpu_layers, threads=threads, workload=workload,
                         kv_store=kv_store, seed=seed, verbose=verbose, overflow_hint=overflow_hint)
        except ValueError as exc:
            model.close()
            raise LocalctxError(f"llama.cpp could not load {facts.path} at {ladder.bottom.n_ctx} tokens ({exc}). "
                                "Run again with --verbose to see llama.cpp's own log.") from None
        if ladder.bottom.self_extend and not engine.windows.current().ctx.can_shift():
            engine.close()
            raise LocalctxError(
                f"Self-Extend moves positions inside the KV cache, and llama.cpp cannot shift this one "
                f"({facts.architecture}: a recurrent or hybrid memory, or positions it cannot re-rotate). "
                "Use a YaRN preset instead."
            )
        return engine

    def close(self) -> None:
        self.windows.close()
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def kv_store(self) -> KVStore | None:
        """Where KV snapshots of long documents go (None: none are used or saved)."""
        return self.snapshots.store

    @kv_store.setter
    def kv_store(self, store: KVStore | None) -> None:  # a run without snapshots (tests, benchmarks)
        self.snapshots.store = store

    # --- the window ----------------------------------------------------------------------------

    @property
    def params(self) -> RuntimeParams:
        return self.windows.params

    @property
    def n_ctx(self) -> int:
        """The window of each sequence of the lane used last."""
        return self.windows.current().ctx.n_ctx

    @property
    def max_ctx(self) -> int:
        """The largest window a request may use (the window itself, unless adaptive)."""
        return self.ladder.top.n_ctx

    @property
    def switches(self) -> list[Switch]:
        return self.windows.switches

    @property
    def llama_arguments(self) -> dict[str, Any]:
        """llama-cpp-python `Llama` arguments with this engine's settings (a raw baseline for benchmarks)."""
        return llama_arguments(str(self.facts.path), self.params, gpu_layers=self.gpu_layers, threads=self.threads,
                               verbose=self.verbose)

    def use_window(self, needed: int) -> Switch | None:
        """Run at the smallest step of the ladder that holds `needed` tokens, in its lane (made
        beside the running ones when memory allows). Returns the switch made, if a new context was."""
        return self.windows.use(needed)

    @property
    def lane(self) -> Lane:
        """The lane used last: its context, sequences and scheduler."""
        return self.windows.current()

    @property
    def scheduler(self) -> Scheduler:
        return self.lane.scheduler

    @property
    def running(self) -> list[Run]:
        """The runs in progress, in every lane."""
        return self.windows.runs()

    def slot(self, seq: int = 0) -> Slot:
        return self.lane.slots[seq]

    def free_slots(self) -> list[Slot]:
        return self.lane.free_slots()

    # --- generation ----------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """The one overflow check: a prompt and its answer budget must fit the largest window, or
        nothing runs (never truncated), and the error names the counts and what would fit."""
        needed = n_prompt + max_tokens
        if needed > self.max_ctx:
            hint = f" A preset that fits: {self.overflow_hint(needed)}" if self.overflow_hint else ""
            window = "a maximum window" if self.ladder.adaptive else "a window"
            raise ContextOverflowError(
                f"The prompt is {n_prompt:,} tokens and the answer budget {max_tokens:,}: {needed:,} in all, "
                f"but preset {self.params.preset} gives {window} of {self.max_ctx:,}. Nothing was truncated.{hint}"
            )

    def check_bias(self, logit_bias: Mapping[int, float] | None) -> None:
        """Token ids of a logit bias must be in the vocabulary (llama.cpp would index past it)."""
        for token in logit_bias or {}:
            if not 0 <= token < self.n_vocab:
                raise LocalctxError(f"Token id {token} in the logit bias is not in the vocabulary "
                                    f"(0 to {self.n_vocab - 1:,}).")

    def start(self, tokens: Sequence[int], *, seq: int | None = None, max_tokens: int = 256,
              temperature: float = 0.0, seed: int | None = None, stop: Sequence[str] = (), top_k: int = 40,
              top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
              frequency_penalty: float = 0.0, presence_penalty: float = 0.0, document_end: int | None = None,
              head_end: int | None = None, mixed: bool = False,
              should_stop: Callable[[], bool] | None = None, logit_bias: Mapping[int, float] | None = None,
              grammar: str | None = None, logprobs: int | None = None) -> Run:
        """Prepare a completion of `tokens` on a free sequence and add it to the scheduler; `step`
        runs it beside the others. The slot's cells are reused for any prefix it holds, so a
        growing chat or a fixed instruction prefix is evaluated once. `document_end`: the prompt's
        tokens up to there are a long document, restored from a KV snapshot when one matches, else
        evaluated and saved as one. `head_end`: the prompt's tokens up to there are a fixed head
        (an instruction), evaluated alone from the first token (or kept when cached) and the rest
        after it, whatever ran before. `mixed`: the prefill may share batches with other runs (the
        server); otherwise it is decoded alone, so the answer does not depend on what ran beside it.
        `logit_bias`: token id -> a value added to its logit. `grammar`: GBNF text (rule `root`) the
        answer must follow (engine.grammar makes one for JSON or a JSON schema). `logprobs`: record
        each generated token's log-probability and this many most likely alternatives
        (Run.picks; engine.logprobs)."""
        tokens = list(tokens)
        self.check_fits(len(tokens), max_tokens)
        self.check_bias(logit_bias)
        self.use_window(len(tokens) + max_tokens)
        lane = self.lane
        slot = lane.slots[seq] if seq is not None else lane.free_slots()[0]  # can_start: one is free
        if seed is not None:
            self._seed = seed
        # Made first: a grammar llama.cpp refuses fails here, before the slot is touched.
        sampler = Sampler(self.n_vocab, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, seed=self._seed, logit_bias=logit_bias,
                          grammar=grammar, vocab=self.model.vocab)
        gen = Generation(iter(()), window=lane.ctx.n_ctx, params=lane.params)
        t = gen.timings
        t.prompt_tokens = len(tokens)
        held = slot.held(tokens)
        split = (self.snapshots.document(slot, tokens, document_end, t, should_stop)
                 if document_end is not None else None)
        # With a fixed head the rest is always evaluated from the split (the document's end, or the
        # head's), never from a longer prefix a previous call left; a chat (no head) reuses its turns.
        limit = len(tokens)
        if head_end is not None:
            limit = split if split is not None else slot.fixed_head(tokens, head_end, should_stop)
        cached = min(slot.held(tokens), len(tokens) - 1, limit)
        pending, start = slot.cut(cached, tokens[cached:])
        # Not evaluated for this prompt: the cells found (restored from a snapshot or left by the
        # slot's last use), less a document evaluated just now (its cells are this prompt's own work).
        evaluated = split if split is not None and held < split and not t.restored_tokens else 0
        t.cached_tokens = max(0, start - evaluated)
        run = Run(slot, pending, sampler, max_tokens=max_tokens, stop=list(stop), is_eog=self.is_eog,
                  piece=self.model.piece, gen=gen, mixed=mixed, should_stop=should_stop, logprobs=logprobs)
        lane.scheduler.add(run)
        return run

    def step(self) -> None:
        """One round of every run in progress: in each lane, one shared llama_decode (plus any
        lone prefill)."""
        for lane in self.windows:
            if lane.scheduler.runs:
                lane.scheduler.step()

    def generate(self, tokens: Sequence[int], *, should_stop: Callable[[], bool] | None = None,
                 **kwargs: Any) -> Generation:
        """Stream a completion of `tokens` (the arguments of `start`), stepping the scheduler
        as the stream is read."""
        run = self.start(tokens, seq=0 if self.n_seq == 1 else None, should_stop=should_stop, **kwargs)
        run.gen.chunks = self._follow(run)
        return run.gen

    def _follow(self, run: Run) -> Iterator[str]:
        try:
            while not run.done:
                self.step()
                yield from run.drain()
            yield from run.drain()
            if run.error is not None:
                raise run.error
        finally:
            if not run.done:  # the reader stopped early: the run ends and its sequence is free
                run.end(flush=False)
                self._prune()

    def complete(self, tokens: Sequence[int], **kwargs: Any) -> Generation:
        """Run `generate` to the end and return the finished Generation."""
        return self.generate(tokens, **kwargs).finish()

    def generate_many(self, requests: Sequence[Mapping[str, Any]], *,
                      keep_errors: bool = False) -> list[Generation | LocalctxError]:
        """Complete every request (the keyword arguments of `start`, with `tokens`), up to `n_seq`
        at a time as parallel sequences, and return them in order. Each prefill is decoded alone
        (the chunks a lone run uses), so a request's prompt logits do not depend on what ran beside
        it; generated tokens share one batch per step. A request that fails raises its error, or
        with `keep_errors` takes its place in the result while the others go on."""
        out: list[Generation | LocalctxError | None] = [None] * len(requests)
        queue = list(enumerate(requests))
        running: list[tuple[int, Run]] = []
        while queue or running:
            while queue and len(running) < self.n_seq and self.can_start(len(queue[0][1]["tokens"]),
                                                                           queue[0][1].get("max_tokens", 256)):
                i, kwargs = queue.pop(0)
                try:
                    running.append((i, self.start(**{**kwargs, "mixed": False})))
                except LocalctxError as exc:
                    out[i] = self._failed(exc, keep_errors)
            if running:
                self.step()
            for i, run in [x for x in running if x[1].done]:
                run.drain()
                out[i] = run.gen if run.error is None else self._failed(run.error, keep_errors)
            running = [x for x in running if not x[1].done]
        return out  # type: ignore[return-value]

    def _failed(self, exc: BaseException, keep: bool) -> LocalctxError:
        if keep and isinstance(exc, LocalctxError):
            return exc
        for run in self.running:  # nothing keeps running behind a raised error
            run.end(flush=False)
        self._prune()
        raise exc

    def _prune(self) -> None:
        for lane in self.windows:
            lane.scheduler.runs = [r for r in lane.scheduler.runs if not r.done]

    def can_start(self, n_prompt: int, max_tokens: int) -> bool:
        """Whether a request can start beside the running ones: its step's lane has a free
        sequence, or a lane of that step fits beside the busy ones (engine.windows)."""
        return self.windows.can_start(n_prompt + max_tokens)

    # --- scoring -------------------------------------------------------------------------------

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int], *, seq: int = 0,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Evaluate `tokens` from an empty sequence and return the next-token logits after each index
        in `positions` (shape len(positions) × n_vocab). Logits are requested for those positions
        only, so memory does not grow with the window. The tokens stay in the sequence for reuse."""
        n = len(tokens)
        if n > self.max_ctx:
            raise ContextOverflowError(f"{n:,} tokens do not fit the {self.max_ctx:,}-token window.")
        self.use_window(n)
        slot = self.lane.slots[seq]
        wanted = sorted(set(positions))
        if wanted and (wanted[0] < 0 or wanted[-1] >= n):
            raise ValueError("positions must index into tokens")
        index = {p: i for i, p in enumerate(wanted)}
        out = np.empty((len(wanted), self.n_vocab), dtype=np.float32)
        ctx = slot.ctx
        slot.clear()

        def keep(at: int, row: int) -> None:
            out[index[at]] = np.ctypeslib.as_array(ctx.logits(row), shape=(self.n_vocab,))

        slot.decode(list(tokens), index.__contains__, keep, should_stop)
        return out[[index[p] for p in positions]] if list(positions) != wanted else out

    def logits_many(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                    should_stop: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """`logits_at` for each (tokens, positions) request, up to `n_seq` at a time as parallel
        sequences sharing batches, each row's logits the same as alone (engine.scoring). All
        requests must run at one window (an adaptive engine's step)."""
        longest = max((len(tokens) for tokens, _ in requests), default=0)
        if longest > self.max_ctx:
            raise ContextOverflowError(f"{longest:,} tokens do not fit the {self.max_ctx:,}-token window.")
        if len({self.ladder.step_for(len(tokens)) for tokens, _ in requests}) > 1:
            raise ValueError("logits_many: every request must run at the same window")
        self.use_window(longest)
        return score_many(self.lane.slots, self.lane.ctx, self.n_vocab, requests, should_stop)

    # --- state ----------------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget every evaluated token: the next request starts from an empty KV cache, as in a
        new process (and so restores a snapshot where one matches)."""
        for lane in self.windows:
            for slot in lane.slots:
                slot.clear()

    def last_logits(self) -> np.ndarray:
        """The next-token logits after the last evaluated token (after `generate(..., max_tokens=1)`:
        the first answer token's distribution)."""
        ptr = self.lane.ctx.logits(-1)
        if not ptr:
            raise LocalctxError("No logits yet: nothing has been evaluated since the cache was reset.")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def snapshot_key(self) -> SnapshotKey:
        return self.snapshots.key(self.params, self.lane.ctx.layout)

    def max_position(self, seq: int = 0) -> int:
        """The largest position in the sequence's cells (-1 when empty): under Self-Extend it stays
        below the trained context however long the prompt."""
        return self.lane.ctx.pos_max(seq)
