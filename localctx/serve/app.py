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
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ..engine import Engine
from ..errors import ResourceError
from .protocol import ApiError, ApiRequest, Outcome, Shapes, parse_chat, parse_completion
from .worker import ModelWorker, status_of

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 16 * 2**20  # a 1M-token document is about 4 MB of text; JSON escaping can double it
LOG_KEY = "localctx.log"


def model_id(engine: Engine) -> str:
    """The name /v1/models lists and responses carry: the GGUF file's name without `.gguf`."""
    name = engine.facts.path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def create_app(engine: Engine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               log: Callable[[str], None] | None = None) -> _Guard:
    """An ASGI app serving `engine` with the OpenAI API; run it with any ASGI server (`serve` uses
    uvicorn). Requests run on a worker thread, up to `engine.n_seq` at once; the app's lifespan shutdown stops
    it (`app.state.worker.stop()` does the same outside a lifespan)."""
    worker = ModelWorker(engine, model_id(engine))
    api = _Api(worker, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                               code=code))

    app = Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model:path}", api.model, methods=["GET"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.worker = worker
    return _Guard(app, api_key, log or _stderr)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class _Guard:
    """Outermost ASGI layer: the API key, one log line per request, and a last resort that turns
    any exception into a JSON 500 (the traceback goes to the log, never into a response)."""

    def __init__(self, app: Starlette, api_key: str | None, log: Callable[[str], None]) -> None:
        self.app, self.log = app, log
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
                await _error(ApiError("Missing or wrong API key: send 'Authorization: Bearer <key>'.", status=401,
                                      code="invalid_api_key"))(scope, receive, record)
            else:
                await self.app(scope, receive, record)
        except Exception:
            import traceback

            traceback.print_exc(file=sys.stderr)
            if not info["status"]:
                await _error(ApiError("The server failed on this request (see its log).", status=500,
                                      type="server_error"))(scope, receive, record)
        finally:
            self.log(_log_line(scope, info, time.perf_counter() - start))

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        assert self._expected is not None
        return hmac.compare_digest(given, self._expected)


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
    def __init__(self, worker: ModelWorker, max_body_bytes: int) -> None:
        self.worker, self.max_body = worker, max_body_bytes

    # --- GET ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        e = self.worker.engine
        return JSONResponse({"status": "ok", "model": self.worker.model_id, "preset": e.params.preset,
                             "max_context": e.max_ctx, "window": e.n_ctx, "pending": self.worker.pending,
                             "parallel": e.n_seq, "running": self.worker.running, "windows": e.windows.in_use()})

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

    async def _complete(self, request: Request, parse: Callable[[Any], ApiRequest]) -> Response:
        info = request.scope[LOG_KEY]
        try:
            api = parse(await self._read_json(request))
        except ApiError as err:
            info["error"] = err.message
            return _error(err)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = self.worker.submit(api, loop, queue)
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job.cancel, info))
        shapes = Shapes(api, self.worker.model_id)
        try:
            kind, value = await queue.get()  # "start", or "error" (overflow, bad template, cancelled)
            if kind == "error":
                err = status_of(value)
                info["error"] = err.message
                return _error(err)
            if api.stream:
                stream = _EventStream(queue, shapes, info, watcher, job.cancel)
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
                return _error(err)
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
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise too_big
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
    """Server-sent events from the job's queue: a first chunk with the role, one chunk per piece of
    text (pieces already waiting are sent together), the finish reason, the usage chunk when asked
    (stream_options.include_usage), then [DONE]. An error after the start is sent as an error event."""

    media_type = "text/event-stream"

    def __init__(self, queue: asyncio.Queue, shapes: Shapes, info: dict[str, Any], watcher: asyncio.Future,
                 cancel: threading.Event) -> None:
        # Not Response.__init__: it would declare a Content-Length for the empty initial body.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.queue, self.shapes, self.info, self.watcher, self.cancel = queue, shapes, info, watcher, cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._send(send, [self.shapes.chunk(None, first=True)])
            done = False
            while not done:
                events = [await self.queue.get()]
                while not self.queue.empty():
                    events.append(self.queue.get_nowait())
                chunks: list[Any] = []
                for kind, value in events:
                    if kind == "text":  # (text, the logprobs of its tokens or None)
                        chunks.append(self.shapes.chunk(value[0], logprobs=value[1]))
                    elif kind == "done":
                        self.info["outcome"] = value
                        chunks.append({**self.shapes.chunk(None, value.finish_reason), "localctx": value.details})
                        if self.shapes.request.include_usage:
                            chunks.append(self.shapes.usage_chunk(value))
                        chunks.append("[DONE]")
                        done = True
                    else:
                        err = status_of(value)
                        self.info["error"] = err.message
                        chunks.append(err.body())
                        done = True
                await self._send(send, chunks)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.cancel.set()
            self.watcher.cancel()

    @staticmethod
    async def _send(send: Send, chunks: list[Any]) -> None:
        data = "".join(f"data: {c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks)
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


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free one), so the address is known before serving starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections made before the event loop starts wait in the backlog
    except OSError as exc:
        raise ResourceError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}). Choose another --port "
                            "or --host.") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          max_body_bytes: int = MAX_BODY_BYTES, ready: Callable[[str], None] | None = None) -> None:
    """Serve `engine` on http://host:port until Ctrl-C or SIGTERM; then the request in flight is
    stopped, queued ones are refused (503), and it returns. `ready(url)` is called once listening.
    The engine stays open: the caller closes it."""
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    sock = listen(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http="h11", loop="asyncio",
                            timeout_graceful_shutdown=30)
    worker: ModelWorker = app.state.worker
    server = _Server(config, worker.stopping.set)
    if ready is not None:
        ready(f"http://{shown}:{bound[1]}")
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
