"""The Summarizer: one loaded engine's planning and model calls for a batch (or a cluster worker's
share of one)."""
from __future__ import annotations

import math
import time
from typing import Any

from ..errors import ContextOverflowError, InputError, LocalctxError
from ..summary_store import Store
from .flow import Call, Frame, Group, Plan, Request, document_result, group_parts, run_flow, summary_flow
from .options import REDUCE_NOTE, BatchStats, Document, Reporter, SummarizeOptions, call_key

class Summarizer:
    """Summarizes documents over one loaded engine, reusing and filling the store (a cluster's
    workers only `execute` requests: the driver keeps the store)."""

    def __init__(self, engine: Any, store: Store, options: SummarizeOptions, fp: str, reporter: Reporter) -> None:
        self.engine, self.store, self.options, self.fp, self.reporter = engine, store, options, fp, reporter
        self.map_frame = Frame.render(engine, options.prompt)
        self.reduce_frame = Frame.render(engine, f"{options.prompt}\n{REDUCE_NOTE}")
        # Chunks and reduce calls fill the smallest window (unscaled, with auto); one pass may use
        # up to the largest, and with auto only up to one_pass_max_scale.
        ladder = engine.ladder
        self.window = ladder.top.n_ctx
        self.chunk_window = ladder.bottom.n_ctx
        one_pass = self.window
        if ladder.adaptive:
            one_pass = min(one_pass, int(ladder.bottom.n_ctx * max(1.0, options.one_pass_max_scale)))
        self.room = self._room(self.map_frame, self.chunk_window)
        self.reduce_room = self._room(self.reduce_frame, self.chunk_window)
        self.one_pass_room = self._room(self.map_frame, one_pass)
        self.stats = BatchStats()
        self._doc_tokens_done = 0
        self._check_settings()

    def _room(self, frame: Frame, window: int) -> int:
        return window - frame.overhead - self.options.max_summary_tokens

    def _check_settings(self) -> None:
        n_ctx, budget = self.chunk_window, self.options.max_summary_tokens
        overhead = self.reduce_frame.overhead
        if overhead >= n_ctx:
            raise ContextOverflowError(
                f"The summary prompt alone is {overhead:,} tokens, larger than the {n_ctx:,}-token window "
                f"(preset {self.engine.params.preset}). Shorten --prompt / --prompt-file or use a larger preset."
            )
        # A reduce step must hold at least two partial summaries, or combining never converges.
        if self.reduce_room < 2 * budget:
            raise ContextOverflowError(
                f"The summary prompt takes {overhead:,} tokens and each answer {budget:,}: that leaves "
                f"{max(self.reduce_room, 0):,} tokens of the {n_ctx:,}-token window (preset "
                f"{self.engine.params.preset}) for text, too little to combine two partial summaries. "
                "Shorten --prompt, lower --max-summary-tokens, or use a larger preset."
            )
        chunk = self.options.chunk_tokens
        largest = self._room(self.map_frame, self.window)
        if chunk is not None and chunk > largest:
            raise ContextOverflowError(
                f"--chunk-tokens {chunk:,} does not fit: with the prompt ({self.map_frame.overhead:,} tokens) "
                f"and the answer budget ({budget:,}) the {self.window:,}-token window holds at most {largest:,}."
            )
        if self.options.overlap >= (chunk or self.room) // 2:
            raise InputError(f"--overlap {self.options.overlap} must be less than half the chunk size ({chunk or self.room}).")

    # --- planning --------------------------------------------------------------------------------

    def plan(self, doc: Document) -> Plan:
        tokens = self.engine.count(doc.text)
        fits = tokens <= self.one_pass_room  # never less than the chunk room
        strategy = self.options.strategy
        if strategy == "auto":
            strategy = "stuff" if fits else "map-reduce"
        if strategy == "stuff":
            return Plan("stuff", tokens, [doc.text])
        return Plan("map-reduce", tokens, self._split(doc, tokens))

    def _split(self, doc: Document, tokens: int) -> list[str]:
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        cap = self.options.chunk_tokens or self.room
        # Balance the chunks: ceil(n / cap) chunks of about equal size summarize more evenly than
        # full chunks and a small remainder, and cost the same number of calls.
        k = max(1, math.ceil(tokens / max(1, cap - self.options.overlap)))
        target = min(cap, math.ceil(tokens / k) + self.options.overlap)
        capacity = (max(1, int(target * 0.9)), cap)
        markdown_like = doc.source.path is not None and doc.source.path.suffix.lower() in (".md", ".markdown")
        splitter_cls = MarkdownSplitter if markdown_like else TextSplitter
        splitter = splitter_cls.from_callback(self.engine.count, capacity, overlap=self.options.overlap)
        return [c for c in splitter.chunks(doc.text) if c.strip()]

    # --- running ---------------------------------------------------------------------------------

    def summarize(self, doc: Document, plan: Plan, index: int, total: int) -> dict[str, Any]:
        self.reporter.doc_start(index, total, doc.label, plan.strategy, plan.tokens, len(plan.chunks))
        start = time.perf_counter()
        calls: list[dict[str, Any]] = []
        summary = run_flow(summary_flow(plan), lambda requests: self.answer([(r, calls) for r in requests]))
        reused = sum(c["seconds"] for c in calls if c["cached"])
        return document_result(plan, calls, summary, time.perf_counter() - start + reused)

    def answer(self, requests: list[tuple[Request, list[dict[str, Any]]]]) -> list[Any]:
        """Answer a round of independent requests, each recording its calls in its own list: stored
        calls from the store, the rest together as parallel sequences of the engine (one at a time
        when it holds one), each stored as soon as its round is done."""
        answers: list[Any] = [None] * len(requests)
        todo: list[tuple[int, Call, str]] = []
        for i, (request, calls) in enumerate(requests):
            if isinstance(request, Group):
                answers[i] = self.execute(request)
                continue
            key = call_key(self.fp, request.role, request.body)
            hit = self.store.get_call(key)
            if hit is None:
                todo.append((i, request, key))
                continue
            calls.append({**hit, "cached": True})
            self._advance(hit, request.doc_tokens, cached=True)
            answers[i] = hit["summary"]
        for (i, call, key), info in zip(todo, self.run_calls([c for _, c, _ in todo])):
            if isinstance(info, BaseException):
                answers[i] = info
                continue
            self.store.put_call(key, info)
            requests[i][1].append({**info, "cached": False})
            self.stats.add(info)
            self._advance(info, call.doc_tokens, cached=False)
            answers[i] = info["summary"]
        return answers

    def run_calls(self, calls: list[Call]) -> list[dict[str, Any] | BaseException]:
        """Model calls, as parallel sequences when the engine has more than one; a call that fails
        gives its error in its place (the others' answers are kept)."""
        if len(calls) <= 1 or getattr(self.engine, "n_seq", 1) == 1:
            out: list[dict[str, Any] | BaseException] = []
            for call in calls:
                try:
                    out.append(self.run_call(call))
                except LocalctxError as exc:
                    out.append(exc)
            return out
        prepared: list[tuple[Call, dict[str, Any]] | BaseException] = []
        for call in calls:
            try:
                prepared.append((call, self._request(call)))
            except LocalctxError as exc:
                prepared.append(exc)
        ready = [p for p in prepared if not isinstance(p, BaseException)]
        start = time.perf_counter()
        gens = iter(self.engine.generate_many([r for _, r in ready], keep_errors=True))
        seconds = (time.perf_counter() - start) / max(1, len(ready))  # the round's time, shared
        return [p if isinstance(p, BaseException) else self._info(p[0], p[1], next(gens), seconds)
                for p in prepared]

    def execute(self, request: Request) -> Any:
        """Answer one request on this engine: a model call's record (not stored), or the groups."""
        if isinstance(request, Group):
            return self._group(list(request.parts))
        return self.run_call(request)

    def _check_stuff(self, tokens: int) -> None:
        try:
            self.engine.check_fits(tokens + self.map_frame.overhead, self.options.max_summary_tokens)
        except ContextOverflowError as exc:
            raise ContextOverflowError(f"--strategy stuff: the document is {tokens:,} tokens. {exc} "
                                       "Or use --strategy auto (map-reduce).") from None

    def _group(self, parts: list[str]) -> list[list[str]]:
        return group_parts(parts, self.engine.count, self.reduce_room)

    def run_call(self, call: Call) -> dict[str, Any]:
        """Run one model call. The frame's head (the instruction) is evaluated alone from the first
        token and the rest after it, so the answer does not depend on which call this engine ran
        before (llama.cpp's logits depend on the batch split): one process and any worker of a
        cluster give the same summary. A `whole` call's body is the whole document, read in one
        pass, whose KV state is worth a snapshot (its instruction and text come before the tail)."""
        request = self._request(call)
        start = time.perf_counter()
        gen = self.engine.complete(**request)
        return self._info(call, request, gen, time.perf_counter() - start)

    def _request(self, call: Call) -> dict[str, Any]:
        """The engine's arguments for a call (see `run_call`)."""
        frame = self.map_frame if call.role == "map" else self.reduce_frame
        if call.whole:
            self._check_stuff(call.doc_tokens)
        tokens = frame.tokens(self.engine, call.body)
        return dict(tokens=tokens, max_tokens=self.options.max_summary_tokens, temperature=self.options.temperature,
                    seed=self.options.seed, stop=frame.stop, repeat_penalty=self.options.repeat_penalty,
                    document_end=len(tokens) - len(frame.tail) if call.whole else None, head_end=len(frame.head))

    def _info(self, call: Call, request: dict[str, Any], gen: Any, seconds: float) -> dict[str, Any] | BaseException:
        if isinstance(gen, BaseException):
            return gen
        return {"role": call.role, "prompt_tokens": len(request["tokens"]),
                "generated_tokens": gen.timings.generated_tokens, "seconds": round(seconds, 3),
                "window": gen.window,  # the one this call ran at
                "restored_tokens": gen.timings.restored_tokens, "summary": gen.text.strip()}

    def _advance(self, info: dict[str, Any], doc_tokens: int, cached: bool) -> None:
        self._doc_tokens_done += doc_tokens
        self.reporter.call_done({**info, "cached": cached}, self._doc_tokens_done)
