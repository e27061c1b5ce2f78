"""The engine-facing half of the server: one thread owns the model and runs up to `engine.n_seq`
requests at once as parallel sequences (continuous batching: each step is one llama_decode with
every running request's next token and the prefill chunks that fit beside them). Everything that
touches the engine happens on that thread, tokenizing included: llama.cpp's context is not
thread-safe, and the chat template compiles lazily. Requests start in arrival order; one that
needs another window of `auto` runs in a context of that window beside the others (a lane), and
waits only when memory has no room for it (engine.windows).

A request becomes a Job; its events (start, text, done, error) go to the event loop through
`call_soon_threadsafe`, so the HTTP side never blocks on the model. A job is cancelled by its
Event (a client that went away) or by the worker's `stopping` (shutdown): a queued job is
skipped, a running one stops before the next step, and its sequence is free at once.

Batched answers may differ slightly from one-at-a-time answers (llama.cpp's logits depend on how
a batch is composed), as with every server that batches; docs/serve.md gives the measured size.

The document boundary, for KV snapshots: a prompt that begins with a long document should
restore that document's snapshot whatever question follows it. The rule matches how `localctx
generate --file` builds its prompt (`document + "\\n\\n" + question`): the document is
everything up to the last paragraph break in the last user message (completions: in the prompt),
with the earlier messages before it; when the last user message has no paragraph break, the
document is the conversation before that message (a document sent as an earlier message or a
system prompt). Snapshots are taken only for boundaries of 2,048 tokens or more (the engine's
threshold), so short prompts are untouched.
"""
from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine import Engine, Run
from ..errors import Cancelled, ContextOverflowError, LocalctxError, ResourceError
from ..generate import common_prefix
from ..kvcache import snapshot_threshold
from .logprobs import Entry, entries
from .protocol import DEFAULT_MAX_TOKENS, ApiError, ApiRequest, Outcome
from .tool_grammar import call_grammar
from .tools import ToolSession, family_of, render_input

PARAGRAPH = "\n\n"
FLUSH_SECONDS = 0.05  # streamed text is sent at most 20 times a second (the first piece at once)


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    document_end: int | None
    max_tokens: int
    stop: list[str]


@dataclass
class Job:
    request: ApiRequest
    post: Callable[[tuple[str, Any]], None]  # thread-safe: hands an event to the request's coroutine
    cancel: threading.Event = field(default_factory=threading.Event)
    run: Run | None = None
    prompt: Prompt | None = None
    pending_text: str = ""
    last_flush: float = 0.0
    tools: ToolSession | None = None  # the tools the model may call: its stream gate and parser
    logprobs: list[Entry] = field(default_factory=list)  # when asked: every generated token's
    sent: int = 0  # how many of them a streamed chunk carried


class ModelWorker:
    """Runs Jobs on `engine`, up to `engine.n_seq` at once, on its own thread."""

    def __init__(self, engine: Engine, model_id: str, report: Callable[[str], None] | None = None) -> None:
        self.engine, self.model_id = engine, model_id
        # Writes the current exception's traceback (the app's rate-limited log: a bug hit at every
        # step must not write a traceback per step).
        self.report = report or (lambda kind: traceback.print_exc(file=sys.stderr))
        self.stopping = threading.Event()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="localctx-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._cv:
            return len(self._queue) + len(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    def progress(self) -> list[dict[str, int]]:
        """Each running request's prompt and how much of it is evaluated so far (read from the HTTP
        side, between steps: a snapshot, not a lock on the model)."""
        with self._cv:
            running = list(self._running)
        out = []
        for job in running:
            run, total = job.run, len(job.prompt.tokens)
            out.append({"window": run.gen.window, "sequence": run.slot.seq, "prompt_tokens": total,
                        "prompt_evaluated": total - len(run.pending),
                        "generated_tokens": run.gen.timings.generated_tokens})
        return out

    def submit(self, request: ApiRequest, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Job:
        def post(event: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        job = Job(request, post)
        with self._cv:
            if self.stopping.is_set():
                job.post(("error", Cancelled("The server is stopping.")))
                return job
            self._queue.append(job)
            self._cv.notify()
        return job

    def stop(self) -> None:
        """Stop the running requests and skip the queued ones; returns once the thread is idle."""
        self.stopping.set()
        with self._cv:
            self._cv.notify()
        self._thread.join()

    # --- on the model thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._running and not self.stopping.is_set():
                    self._cv.wait(timeout=1.0)
                if self.stopping.is_set() and not self._running:
                    for job in self._queue:
                        job.post(("error", Cancelled("The request was cancelled before it started.")))
                    self._queue.clear()
                    return
                admit = self._admissible()
            for i, job in enumerate(admit):
                if not self._start(job):  # it needs another window: it and those after it wait
                    with self._cv:
                        self._queue.extendleft(reversed(admit[i:]))
                    break
            if self._running:
                self._step()

    def _admissible(self) -> list[Job]:
        """Queued jobs that can start now: free sequences, in arrival order (a cancelled one is dropped)."""
        admit: list[Job] = []
        free = self.engine.n_seq - len(self._running)
        while self._queue and len(admit) < free and not self.stopping.is_set():
            job = self._queue[0]
            if job.cancel.is_set():
                self._queue.popleft()
                job.post(("error", Cancelled("The request was cancelled before it started.")))
                continue
            self._queue.popleft()
            admit.append(job)
        return admit

    def _start(self, job: Job) -> bool:
        """Start the job's run (or post its refusal); False when it must wait for another window."""
        engine = self.engine
        try:
            prompt = job.prompt or self.prompt(job.request)
            job.prompt = prompt
            if not engine.can_start(len(prompt.tokens), prompt.max_tokens):
                return False
            s = job.request.sampling
            try:
                engine.check_bias(s.logit_bias)
            except LocalctxError as exc:
                raise ApiError(str(exc), param="logit_bias", code="invalid_value") from None
            job.tools = self._tool_session(job.request)
            job.run = engine.start(prompt.tokens, max_tokens=prompt.max_tokens, temperature=s.temperature,
                                   top_p=s.top_p, seed=s.seed, stop=prompt.stop, document_end=prompt.document_end,
                                   mixed=True, should_stop=lambda: job.cancel.is_set() or self.stopping.is_set(),
                                   frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                                   logit_bias=s.logit_bias, grammar=_grammar(job), logprobs=s.logprobs)
            job.post(("start", None))
            with self._cv:
                self._running.append(job)
        except (LocalctxError, ApiError) as exc:
            job.post(("error", exc))
        except Exception as exc:  # a bug: the client gets a 500 without details, the log the traceback
            self.report("request failed to start")
            job.post(("error", exc))
        return True

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as exc:  # a bug: every running request fails, the server goes on
            self.report("model step failed")
            for job in self._running:
                job.run.end(error=exc)
        now = time.monotonic()
        for job in self._running:
            self._post_text(job, now)
        with self._cv:
            done = [j for j in self._running if j.run.done]
            self._running = [j for j in self._running if not j.run.done]
        for job in done:
            self._finish(job)

    @staticmethod
    def _post_text(job: Job, now: float) -> None:
        """Post the text as it comes, at most one event per FLUSH_SECONDS after the first (pieces
        in between are sent together): each event wakes the event loop and the client, and on a
        CPU where llama.cpp's threads use every core each wake-up delays a token."""
        wanted = job.request.sampling.logprobs is not None
        if wanted:  # token ids to text here, on the model thread
            job.logprobs += entries(job.run.drain_logprobs(), job.run.piece)
        if not job.request.stream:
            job.run.drain()  # the outcome carries the text: no event per token to wake the loop for
            return
        text = "".join(job.run.drain())
        job.pending_text += job.tools.feed(text) if job.tools is not None else text
        ready = job.pending_text or job.logprobs[job.sent:]
        if ready and (job.run.done or now - job.last_flush >= FLUSH_SECONDS):
            job.post(("text", (job.pending_text, job.logprobs[job.sent:] if wanted else None)))
            job.pending_text, job.last_flush, job.sent = "", now, len(job.logprobs)

    def _finish(self, job: Job) -> None:
        run, prompt = job.run, job.prompt
        if run.error is not None:
            job.post(("error", run.error))
            return
        gen = run.gen
        t = gen.timings
        details = {"window": gen.window, "scaling": gen.params.scaling, "max_tokens": prompt.max_tokens,
                   "document_tokens": prompt.document_end or 0, **t.to_dict()}
        logprobs = job.logprobs if job.request.sampling.logprobs is not None else None
        out = Outcome(gen.text, gen.finish_reason, len(prompt.tokens), t.generated_tokens, details,
                      cached_tokens=t.cached_tokens, logprobs=logprobs)
        if job.tools is not None:
            reply, held = job.tools.finish(gen.text)
            if reply.calls:
                out = replace(out, text=reply.content or "", finish_reason="tool_calls", tool_calls=reply.calls)
            elif job.request.stream:
                out = replace(out, held=held)
        job.post(("done", out))

    def _tool_session(self, request: ApiRequest) -> ToolSession | None:
        if request.tools is None or not request.tools.active:
            return None
        return ToolSession(request.tools, family_of(self.engine.tokenizer.template().source))

    def _chat_tokens(self, request: ApiRequest, messages: list[dict[str, Any]] | None = None,
                     add_generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens (the request's, or `messages` with its tools) with its tools:
        through the template's own tool syntax when it has one, else in the generic form
        (tools.render_input), so that a document's head is rendered as the whole prompt is."""
        template = self.engine.tokenizer.template()
        messages, tools = render_input(request.messages if messages is None else messages, request.tools,
                                       template.source, template.variables)
        return self.engine.chat_tokens(messages, add_generation_prompt, tools=tools)

    def prompt(self, request: ApiRequest) -> Prompt:
        """The request's tokens, its document boundary and answer budget; refused (never
        truncated) when they do not fit the largest window."""
        engine = self.engine
        if request.kind == "chat":
            tokens = self._chat_tokens(request)
            stop = list(dict.fromkeys(engine.chat_stop + list(request.sampling.stop)))
        else:
            tokens = engine.tokenize(request.prompt, add_bos=True)
            stop = list(request.sampling.stop)
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            # Not "the rest of the window": with `auto` that would run every request at its largest step.
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, engine.max_ctx - len(tokens)))
        try:
            engine.check_fits(len(tokens), max_tokens)
        except ContextOverflowError as exc:
            raise ApiError(str(exc), param="messages" if request.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        return Prompt(tokens, self.document_end(request, tokens), max_tokens, stop)

    def document_end(self, request: ApiRequest, tokens: list[int]) -> int | None:
        """How many leading tokens are a document (the module's rule); None when too short to keep."""
        threshold = self.engine.kv_store.threshold if self.engine.kv_store is not None else snapshot_threshold()
        if len(tokens) <= threshold:
            return None
        engine = self.engine
        if request.kind == "completion":
            at = request.prompt.rfind(PARAGRAPH)
            head = engine.tokenize(request.prompt[:at], add_bos=True) if at > 0 else None
        else:
            messages = list(request.messages)
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is None:
                return None
            text = messages[last]["content"]
            at = text.rfind(PARAGRAPH)
            if at > 0:
                cut = messages[:last] + [{"role": "user", "content": text[:at]}]
                head = self._chat_tokens(request, cut)  # as generate --file --chat: the document as a whole message
            elif last > 0:
                head = self._chat_tokens(request, messages[:last], add_generation_prompt=False)
            else:
                head = None
        if head is None:
            return None
        end = common_prefix(tokens, head)
        return end if end >= threshold else None


def _grammar(job: Job) -> str | None:
    """What constrains a run's sampling: `response_format`'s JSON grammar, or a call to one of the
    offered tools when tool_choice is "required" or names one (serve/tool_grammar.py); not both."""
    fmt = job.request.sampling.grammar
    if job.tools is None:
        return fmt
    try:
        call = call_grammar(job.tools.request, job.tools.family)
    except Exception as exc:  # the converter's own limits (a schema feature it cannot express)
        raise ApiError(f"The tools' schemas cannot be turned into a grammar for tool_choice: {exc}",
                       param="tools") from None
    if call is not None and fmt is not None:
        raise ApiError("'response_format' and a tool_choice that requires a call cannot both be enforced: "
                       "send one of them.", param="response_format", code="unsupported_parameter")
    return call if call is not None else fmt


def status_of(exc: BaseException) -> ApiError:
    """The HTTP error a failed job becomes."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Cancelled):
        return ApiError(str(exc), status=503, type="server_error", code="cancelled")
    if isinstance(exc, ResourceError):
        return ApiError(str(exc), status=503, type="server_error", code="resource_exhausted")
    if isinstance(exc, LocalctxError):  # bad input the library refused: a template, a control token
        return ApiError(str(exc))
    return ApiError("The server failed on this request (see its log).", status=500, type="server_error")
