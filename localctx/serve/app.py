"""The HTTP side: a Starlette app (routes, body limit, API key, one log line per request) over a
ModelWorker, and `serve`, which runs it under uvicorn until Ctrl-C or SIGTERM.

Starlette + uvicorn rather than FastAPI: the API's validation is hand-written (protocol.py) so
that every refusal has OpenAI's error shape and status (FastAPI's own validation answers 422 in
its own shape), and FastAPI would add pydantic for nothing else. Server-sent events are written
here too (a few lines) rather than with sse-starlette: the stream needs its own cancellation
(a client that goes away stops the model), which those helpers do not carry to a worker thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ..engine import Engine
from ..errors import ResourceError
from . import anthropic
from .limits import (KEEP_ALIVE_SECONDS, TIMED_OUT, EventLog, Gate, GatedSocket, Limits, protocol_class,
                     quiet_loggers)
from .metrics import Metrics
from .protocol import ApiError, ApiRequest, Outcome, Shapes, parse_chat, parse_completion
from .worker import ModelWorker, status_of

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# A streamed request sends an SSE comment this often while nothing else is sent (queued, or its
# prompt being evaluated): well under the shortest read timeouts of common clients and proxies (30-60 s).
SSE_PING_SECONDS = 10.0
MAX_BODY_BYTES = 16 * 2**20  # a 1M-token document is about 4 MB of text; JSON escaping can double it
LOG_KEY = "localctx.log"
MESSAGES_PATH = "/v1/messages"  # Anthropic's Messages API: its errors have Anthropic's shape


def model_id(engine: Engine) -> str:
    """The name /v1/models lists and responses carry: the GGUF file's name without `.gguf`."""
    name = engine.facts.path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               log: Callable[[str], None] | None = None, body_timeout: float | None = None,
               sse_ping_interval: float = SSE_PING_SECONDS) -> _Guard:
    """An ASGI app serving `engine` with the OpenAI API; run it with any ASGI server (`serve` uses
    uvicorn). Requests run on a worker thread, up to `engine.n_seq` at once; the app's lifespan shutdown stops
    it (`app.state.worker.stop()` does the same outside a lifespan)."""
    events = EventLog(log or _stderr)
    worker = ModelWorker(engine, model_id(engine), report=events.exception)
    api = _Api(worker, max_body_bytes, body_timeout, sse_ping_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                               code=code), request.url.path)

    app = Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model:path}", api.model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/messages", api.messages, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.worker, app.state.metrics, app.state.gate = worker, Metrics(), None  # gate: set by serve
    return _Guard(app, api_key, events)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _error(err: ApiError, path: str = "") -> JSONResponse:
    """The error in the shape of the API the path belongs to: Anthropic's under /v1/messages."""
    body = anthropic.error_body(err) if path.startswith(MESSAGES_PATH) else err.body()
    return JSONResponse(body, status_code=err.status)


class _Guard:
    """Outermost ASGI layer: the API key, one log line per request, and a last resort that turns
    any exception into a JSON 500 (the traceback goes to the log, never into a response)."""

    def __init__(self, app: Starlette, api_key: str | None, events: EventLog) -> None:
        self.app, self.events = app, events
        self.state = app.state
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, info = time.perf_counter(), {"status": 0}
        scope[LOG_KEY] = info

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            if self._expected is not None and scope["path"] != "/health" and not self._authorized(scope):
                await _error(ApiError("Missing or wrong API key: send 'Authorization: Bearer <key>' (or "
                                      "'x-api-key: <key>').", status=401, code="invalid_api_key"),
                             scope["path"])(scope, receive, record)
            else:
                await self.app(scope, receive, record)
        except Exception:
            self.events.exception("request failed")
            if not info["status"]:
                await _error(ApiError("The server failed on this request (see its log).", status=500,
                                      type="server_error"), scope["path"])(scope, receive, record)
        finally:
            self._log(scope, info, time.perf_counter() - start)

    def _log(self, scope: Scope, info: dict[str, Any], seconds: float) -> None:
        """One line per model request (as many as the model answers); any other request at most one
        line a second per route (health checks, model lists) or per status (refusals), so a flood
        of requests cannot fill the disk."""
        line = _log_line(scope, info, seconds)
        status = info["status"]
        self.state.metrics.record(scope["path"], status, info.get("outcome"))
        if info.get("outcome") is not None or info.get("disconnected"):
            self.events.write(line)
        elif status < 400:  # a route that exists: a bounded set of kinds
            self.events.event(f"{scope['method']} {scope['path']}", line)
        else:
            self.events.event(f"status {status}", line)

    def _authorized(self, scope: Scope) -> bool:
        assert self._expected is not None
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        key = b"Bearer " + headers.get(b"x-api-key", b"")  # Anthropic's clients send the key in this header
        # Both compared, always: the time taken does not tell which header was right.
        return hmac.compare_digest(bearer, self._expected) | hmac.compare_digest(key, self._expected)


def _log_line(scope: Scope, info: dict[str, Any], seconds: float) -> str:
    client = scope.get("client") or ("-", 0)
    line = f"[serve] {client[0]} {scope['method']} {scope['path']} {info['status']} {seconds:.2f} s"
    out: Outcome | None = info.get("outcome")
    if out is not None:
        d = out.details
        line += (f" prompt {out.prompt_tokens:,} + {out.completion_tokens:,} tokens ({out.finish_reason}), "
                 f"window {d['window']:,} ({d['scaling']})")
        if d["restored_tokens"]:
            line += f", restored {d['restored_tokens']:,}"
        if d["saved_tokens"]:
            line += f", saved {d['saved_tokens']:,}"
    if info.get("error"):
        line += f": {info['error']}"
    if info.get("disconnected"):
        line += " (client went away)"
    return line


class _Api:
    def __init__(self, worker: ModelWorker, max_body_bytes: int, body_timeout: float | None, ping: float) -> None:
        self.worker, self.max_body, self.body_timeout = worker, max_body_bytes, body_timeout
        self.ping = ping or None  # 0: no pings

    # --- GET ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        e = self.worker.engine
        return JSONResponse({"status": "ok", "model": self.worker.model_id, "preset": e.params.preset,
                             "max_context": e.max_ctx, "window": e.n_ctx, "pending": self.worker.pending,
                             "parallel": e.n_seq, "running": self.worker.running, "windows": e.windows.in_use(),
                             "progress": self.worker.progress()})

    async def metrics(self, request: Request) -> Response:
        state = request.app.state
        return PlainTextResponse(state.metrics.render(self.worker, state.gate),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def _card(self) -> dict[str, Any]:
        path = self.worker.engine.facts.path
        created = int(path.stat().st_mtime) if path.exists() else 0
        return {"id": self.worker.model_id, "object": "model", "created": created, "owned_by": "localctx"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.worker.model_id:
            return _error(ApiError(f"The model {name!r} does not exist: this server serves {self.worker.model_id!r}.",
                                   status=404, param="model", code="model_not_found"))
        return JSONResponse(self._card())

    # --- POST --------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, parse_completion)

    async def messages(self, request: Request) -> Response:
        return await self._complete(request, anthropic.parse_messages, anthropic.MessageShapes)

    async def _complete(self, request: Request, parse: Callable[[Any], ApiRequest],
                        make_shapes: Callable[[ApiRequest, str], Any] = Shapes) -> Response:
        info = request.scope[LOG_KEY]
        path = request.url.path
        try:
            api = parse(await self._read_json(request))
        except ApiError as err:
            info["error"] = err.message
            return _error(err, path)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = self.worker.submit(api, loop, queue)
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job.cancel, info))
        shapes = make_shapes(api, self.worker.model_id)
        try:
            # "start", or "error" (overflow, bad template, cancelled). A stream that waits longer than a
            # ping interval (queued, or its document being evaluated) starts at once, to send pings:
            # a refusal found after that comes as an error event.
            try:
                kind, value = await asyncio.wait_for(queue.get(), self.ping if api.stream else None)
            except asyncio.TimeoutError:
                kind, value = "start", None
            if kind == "error":
                err = status_of(value)
                info["error"] = err.message
                return _error(err, path)
            if api.stream:
                stream = _EventStream(queue, shapes, info, watcher, job.cancel, self.ping)
                watcher = None  # the stream owns it now
                return stream
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    continue  # the outcome carries the whole text
                if kind == "done":
                    info["outcome"] = value
                    return JSONResponse(shapes.complete(value))
                err = status_of(value)
                info["error"] = err.message
                return _error(err, path)
        finally:
            if watcher is not None:
                job.cancel.set()  # a no-op once the job is over; stops it if this coroutine is cancelled
                watcher.cancel()

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON, refused with 413 past the limit (announced or streamed) and with 400
        when it is not JSON (NaN and Infinity included: they are not JSON and would pass range checks)."""
        length = request.headers.get("content-length")
        too_big = ApiError(f"The request body exceeds the server's limit of {self.max_body:,} bytes.", status=413,
                           code="request_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if not length.isdigit():
                raise ApiError("Malformed Content-Length header.")
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    raise too_big
        except ClientDisconnect:  # gone, or closed by the body timeout (limits.py): no one reads the answer
            if request.scope.get(TIMED_OUT):
                raise ApiError(f"The request body did not arrive within {self.body_timeout:g} s.", status=408,
                               code="request_timeout") from None
            raise ApiError("The client closed the connection before its request body was complete.",
                           status=499, code="client_closed") from None
        if not body:
            raise ApiError("The request body is empty: send a JSON object.")
        try:
            return json.loads(body, parse_constant=_no_constant)
        except RecursionError:
            raise ApiError("The request body is nested too deeply.") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(f"The request body is not valid JSON ({exc}).") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


async def _watch_disconnect(receive: Receive, cancel: threading.Event, info: dict[str, Any]) -> None:
    """Wait for the client to go away (the body is already read), then cancel its job."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            info["disconnected"] = True
            cancel.set()
            return


class _EventStream(Response):
    """Server-sent events from the job's queue, written by the request's API shapes (protocol.Shapes:
    a first chunk with the role, one chunk per piece of text (pieces already waiting are sent
    together), any tool calls, the finish reason, the usage chunk when asked, then [DONE];
    anthropic.MessageShapes: Anthropic's events). An error after the start is sent as an error event."""

    media_type = "text/event-stream"

    def __init__(self, queue: asyncio.Queue, shapes: Any, info: dict[str, Any], watcher: asyncio.Future,
                 cancel: threading.Event, ping: float | None = None) -> None:
        # Not Response.__init__: it would declare a Content-Length for the empty initial body.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.queue, self.shapes, self.info, self.watcher, self.cancel = queue, shapes, info, watcher, cancel
        self.ping = ping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._send(send, self.shapes.sse_open())
            done = False
            while not done:
                try:
                    events = [await asyncio.wait_for(self.queue.get(), self.ping)]
                except asyncio.TimeoutError:  # nothing to send for a while (a long prompt): keep the line alive
                    await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
                    continue
                while not self.queue.empty():
                    events.append(self.queue.get_nowait())
                chunks: list[str] = []
                for kind, value in events:
                    if kind == "start":
                        continue  # the stream began before it (it waited over a ping interval)
                    if kind == "text":  # (text, the logprobs of its tokens or None)
                        chunks += self.shapes.sse_text(*value)
                    elif kind == "done":
                        self.info["outcome"] = value
                        chunks += self.shapes.sse_done(value)
                        done = True
                    else:
                        err = status_of(value)
                        self.info["error"] = err.message
                        chunks += self.shapes.sse_error(err)
                        done = True
                await self._send(send, chunks)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.cancel.set()
            self.watcher.cancel()

    @staticmethod
    async def _send(send: Send, events: list[str]) -> None:
        data = "".join(events)
        await send({"type": "http.response.body", "body": data.encode("utf-8"), "more_body": True})


# --- running it ---------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, with two changes at shutdown: the model's worker is told to stop first (so an
    in-flight generation ends now, not after its last token), and the signal is not raised again
    once the server has stopped (uvicorn does, which turns SIGTERM into exit status 143)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def listen(host: str, port: int, gate: Gate | None = None) -> socket.socket:
    """A bound socket (port 0: any free one), so the address is known before serving starts; with
    a gate, one that closes connections past the file descriptors there are (limits.GatedSocket)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        if gate is not None:
            sock = GatedSocket(family, kind, proto)
            sock.gate = gate
        else:
            sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Connections made before the event loop starts, or faster than it accepts, wait in the backlog:
        # as long a one as the kernel allows (it caps this at net.core.somaxconn), so a flood of
        # connects does not overflow it and leave a health check waiting for a TCP retransmission.
        sock.listen(65535)
    except OSError as exc:
        raise ResourceError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}). Choose another --port "
                            "or --host.") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          max_body_bytes: int = MAX_BODY_BYTES, ready: Callable[[str], None] | None = None,
          limits: Limits | None = None, sse_ping_interval: float = SSE_PING_SECONDS) -> None:
    """Serve `engine` on http://host:port until Ctrl-C or SIGTERM; then the request in flight is
    stopped, queued ones are refused (503), and it returns. `ready(url)` is called once listening.
    `limits`: connections and read timeouts (limits.py); raises the process's soft file
    descriptor limit to the hard one. `sse_ping_interval`: seconds between `: ping` comments on a
    stream with nothing else to send (0: none). The engine stays open: the caller closes it."""
    limits = limits or Limits()
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=limits.body_timeout,
                     sse_ping_interval=sse_ping_interval)
    gate = Gate.for_limits(limits, app.events)
    app.state.gate = gate
    sock = listen(host, port, gate)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=protocol_class(limits, gate),
                            loop="asyncio", timeout_graceful_shutdown=30, timeout_keep_alive=KEEP_ALIVE_SECONDS)
    quiet_loggers()  # after uvicorn configured its loggers
    worker: ModelWorker = app.state.worker
    server = _Server(config, worker.stopping.set)
    if ready is not None:
        ready(f"http://{shown}:{bound[1]}")
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
        app.events.flush()
