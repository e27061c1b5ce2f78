"""The server under abuse: bounded connections, file descriptors, read timeouts and logs.

Measured before this module (benchmarks/RESULTS.md, "the server under abuse"): 10,100 idle
connections used up the process's file descriptors, `/health` then timed out, asyncio's accept
loop logged 450,000 tracebacks (182 MB) in a minute (on EMFILE it logs and retries once per
pending connection, not once per second), and sockets that sent half a request head were never
closed. What each piece here does about it:

- **File descriptors.** At start the soft RLIMIT_NOFILE is raised to the hard one. The listening
  socket is a `GatedSocket`: asyncio's only way in is its `accept()`, which counts every accepted
  socket until it is closed (`Gate.open`). At `Gate.fd_cap` (the fd limit less those already open
  and a reserve for the process's own files) it first closes the oldest connection that has not
  sent a request head, so an idle flood gives way to new clients (a health check among them);
  with none to close, the new connection is closed at once. So accept never meets EMFILE.
- **Connections.** Up to `max_connections` are served normally. Those beyond it (up to the fd cap)
  get a short time to send their request head and are answered 503 in OpenAI's error shape with
  `Connection: close`, except `GET /health`, which is served on any connection so a health check
  answers under a flood.
- **Read timeouts** (uvicorn has none for a request head, and a keep-alive timer that any byte
  cancels): a connection must deliver its whole request head within `header_timeout` of opening
  (or of its previous response), and its body within `body_timeout` of the head; otherwise it is
  closed (a body that is late gets a 408 first). A request being answered has no deadline.
- **Not uvicorn's `limit_concurrency`:** it is checked only when a request head arrives (idle
  connections are never bounded), answers 503 in plain text, logs a warning per refusal, and
  refuses /health too. h11 buffers at most 16 KiB of a request head it cannot parse yet (more: 400).
- **Logs.** uvicorn's and asyncio's loggers, and the server's own lines for these events, write at
  most one line per kind of event per second, and the next line says how many were suppressed.
"""
from __future__ import annotations

import _socket
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ResourceError
from .protocol import error_body

DEFAULT_MAX_CONNECTIONS = 1024  # agents and editors hold a few each; 1,024 idle ones cost ~1,024 fds and a few MiB
DEFAULT_HEADER_TIMEOUT = 10.0  # a request head is under 16 KiB: seconds even on a slow link
DEFAULT_BODY_TIMEOUT = 60.0  # the 16 MiB default body limit at ~280 KB/s
KEEP_ALIVE_SECONDS = 5  # uvicorn's default: an idle connection between requests
EVICT_MAX = 32  # connections being closed to make room at once (their descriptors free a moment later)
FD_RESERVE = 64 + EVICT_MAX  # descriptors kept for the process itself (snapshot files, the model, pipes)
OVERFLOW_ROOM = 16  # at least this many connections beyond the limit, to answer 503 and /health
OVERFLOW_HEAD_SECONDS = 2.0  # a connection over the limit has this long to send its head
GATE_BURST = 256  # connections closed at once per accept() call when at the fd cap


@dataclass(frozen=True)
class Limits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT


# --- logs ---------------------------------------------------------------------------------------


class RateLimit:
    """At most one event of each kind per `seconds`; `allow` returns how many were suppressed
    since the last one it let through (None: suppress this one)."""

    def __init__(self, seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self._last: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}
        self._lock = threading.Lock()  # the model thread reports its failures too

    def allow(self, key: Any) -> int | None:
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.seconds:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            if len(self._last) > 1000:  # keys are a few fixed kinds; never let them grow without bound
                self._last.clear()
            self._last[key] = now
            return self._suppressed.pop(key, 0)

    def pending(self) -> dict[Any, int]:
        with self._lock:
            return dict(self._suppressed)


def suppressed_note(n: int) -> str:
    return f" ({n:,} more like this suppressed)" if n else ""


class RateLimitFilter(logging.Filter):
    """A logging filter: one record per (logger, level, message template) per second."""

    def __init__(self, limit: RateLimit) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        n = self.limit.allow((record.name, record.levelno, str(record.msg)))
        if n is None:
            return False
        if n:
            record.msg, record.args = record.getMessage() + suppressed_note(n), None
        return True


class EventLog:
    """The server's own log lines for repeated events, rate-limited by kind."""

    def __init__(self, write: Callable[[str], None], limit: RateLimit | None = None) -> None:
        self.write, self.limit = write, limit or RateLimit()

    def event(self, kind: str, line: str) -> None:
        n = self.limit.allow(kind)
        if n is not None:
            self.write(line + suppressed_note(n))

    def exception(self, kind: str) -> None:
        """The current exception's traceback, at most once a second per kind."""
        n = self.limit.allow(("traceback", kind))
        if n is not None:
            self.write(f"[serve] {kind}: {traceback.format_exc().rstrip()}{suppressed_note(n)}")

    def flush(self) -> None:
        """Say what was suppressed since the last line of each kind (at shutdown)."""
        for kind, n in self.limit.pending().items():
            self.write(f"[serve] {n:,} more {kind if isinstance(kind, str) else kind[1]} events suppressed")


_quiet = RateLimitFilter(RateLimit())


def quiet_loggers(names: tuple[str, ...] = ("uvicorn", "uvicorn.error", "asyncio")) -> None:
    """Rate-limit the loggers that write on connection errors (after uvicorn configured them)."""
    for name in names:
        logger = logging.getLogger(name)
        if _quiet not in logger.filters:
            logger.addFilter(_quiet)


# --- file descriptors ----------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS caps it below an infinite hard limit: keep the soft one
            pass
    return soft if soft != resource.RLIM_INFINITY else 2**20


def open_fds() -> int:
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return FD_RESERVE  # unknown: assume as many as the reserve again


class Gate:
    """Open connections (accepted sockets until closed) against the descriptors there are."""

    def __init__(self, fd_cap: int, max_connections: int, events: EventLog) -> None:
        self.fd_cap, self.max_connections, self.events = fd_cap, max_connections, events
        self.open = 0
        self.waiting: dict[Any, None] = {}  # connections reading a request head, oldest first
        self.evicting = 0  # closed to make room, their descriptors not yet free
        self.evicted = 0
        self.refused = 0  # closed at accept: no descriptor to spare
        self.over_limit = 0  # answered 503 (or served /health) beyond max_connections
        self.timed_out = 0  # closed for a late request head or body

    @classmethod
    def for_limits(cls, limits: Limits, events: EventLog) -> Gate:
        fd_cap = raise_fd_limit() - open_fds() - FD_RESERVE
        if fd_cap < 2 * OVERFLOW_ROOM:
            raise ResourceError(f"Too few file descriptors to serve ({fd_cap + FD_RESERVE} free): raise "
                                "`ulimit -n`.")
        most = min(limits.max_connections, fd_cap - OVERFLOW_ROOM)
        if most < limits.max_connections:
            events.write(f"[serve] --max-connections lowered to {most:,}: the file descriptor limit "
                         f"(ulimit -n) leaves room for {fd_cap:,} connections")
        return cls(fd_cap, most, events)

    def opened(self) -> None:
        self.open += 1

    def has_room(self) -> bool:
        """Whether a new connection may be accepted: under the cap, or once the oldest connection
        still without a request head is closed for it (an idle flood gives way to new clients, a
        health check among them, rather than shutting them out)."""
        if self.open - self.evicting < self.fd_cap:
            return True
        while self.waiting and self.evicting < EVICT_MAX:
            conn = next(iter(self.waiting))
            del self.waiting[conn]
            if conn.evict():
                self.evicting += 1
                self.evicted += 1
                self.events.event("evicted", f"[serve] closed the oldest connection without a request head to "
                                             f"make room: {self.open:,} open, as many as the descriptor limit allows")
                return True
        return False

    def closed(self) -> None:
        self.open -= 1


class _Counted(socket.socket):
    """An accepted connection that tells the gate when it is closed (asyncio closes it once)."""

    gate: Gate | None = None

    def _real_close(self, _ss: Any = _socket.socket) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.closed()
        super()._real_close(_ss)  # type: ignore[misc]


class GatedSocket(socket.socket):
    """The listening socket: asyncio accepts through `accept()`, which makes room at the gate's cap
    (the oldest connection without a request head is closed), leaves new connections in the
    kernel's backlog while that room frees, and closes them at once when every connection is busy
    with a request: never an EMFILE, never a traceback."""

    gate: Gate | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        gate = self.gate
        assert gate is not None
        for _ in range(GATE_BURST):
            if gate.has_room():
                fd, addr = self._accept()  # type: ignore[attr-defined]  # BlockingIOError: none waiting
                conn = _Counted(self.family, self.type, self.proto, fileno=fd)
                conn.gate = gate
                gate.opened()
                return conn, addr
            if gate.evicting:  # room comes as those close (in a moment): the rest wait in the backlog
                break
            fd, _ = self._accept()  # type: ignore[attr-defined]
            os.close(fd)
            gate.refused += 1
            gate.events.event("fd cap", f"[serve] closed a connection at once: {gate.open:,} are open, as many "
                                        "as the file descriptor limit allows, each busy with a request")
        raise BlockingIOError  # asyncio's sign that nothing more waits; the rest next time round


# --- connections --------------------------------------------------------------------------------


def _response(status: int, reason: bytes, message: str, code: str, type: str = "invalid_request_error"
              ) -> tuple[h11.Response, bytes]:
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    head = h11.Response(status_code=status, reason=reason, headers=[
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")])
    return head, body


class _Overflow:
    """The app for a connection over the limit: /health as usual, anything else 503; either way
    the connection then closes."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        self.gate.over_limit += 1
        if scope["type"] == "http" and scope["path"] == "/health":
            await self.app(scope, receive, closing)
            return
        limit = self.gate.max_connections
        message = (f"The server has {limit:,} connections open, its limit (--max-connections): try again "
                   "shortly.")
        body = json.dumps(error_body(message, type="server_error", code="too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
        self.gate.events.event("over limit", f"[serve] {scope.get('client', ('-',))[0]} {scope['method']} "
                                             f"{scope['path']} 503: over --max-connections {limit:,}")


def protocol_class(limits: Limits, gate: Gate) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection limit and the read timeouts."""

    class Connection(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._timer: Any = None
            self._phase = ""
            self._evicted = False
            self._head_seconds = limits.header_timeout
            if gate.open > gate.max_connections:
                self.app = _Overflow(self.app, gate)
                self._head_seconds = min(limits.header_timeout, OVERFLOW_HEAD_SECONDS)
            self._track()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            gate.waiting.pop(self, None)
            if self._evicted:
                self._evicted = False
                gate.evicting -= 1
            super().connection_lost(exc)

        def evict(self) -> bool:
            if self.transport.is_closing():
                return False
            self._cancel()
            self._evicted = True
            self.transport.abort()
            return True

        def _track(self) -> None:
            """Arm the deadline of what the connection is reading: a head, a body, or nothing."""
            if self.transport.is_closing():
                gate.waiting.pop(self, None)
                return self._cancel()
            their = self.conn.their_state
            phase = "head" if their is h11.IDLE else "body" if their is h11.SEND_BODY else ""
            if phase == self._phase:
                return  # a deadline runs from the start of what it bounds, whatever bytes come meanwhile
            self._cancel()
            self._phase = phase
            if phase == "head":
                gate.waiting[self] = None
            else:
                gate.waiting.pop(self, None)
            if phase:
                seconds = self._head_seconds if phase == "head" else limits.body_timeout
                self._timer = self.loop.call_later(seconds, self._expired)

        def _cancel(self) -> None:
            if getattr(self, "_timer", None) is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            gate.timed_out += 1
            if self._phase == "body":
                seconds = limits.body_timeout
                if self.cycle is not None and not self.cycle.response_started:
                    self.scope[TIMED_OUT] = True  # the app, waiting for the body, logs a 408
                    self._send_408(f"The request body did not arrive within {seconds:g} s (--body-timeout).")
                gate.events.event("body timeout", f"[serve] {self.client[0] if self.client else '-'}: closed a "
                                                  f"connection whose request body took over {seconds:g} s")
            else:
                gate.events.event("head timeout", f"[serve] {self.client[0] if self.client else '-'}: closed a "
                                                  f"connection that sent no complete request head in "
                                                  f"{self._head_seconds:g} s")
            self.transport.close()

        def _send_408(self, message: str) -> None:
            head, body = _response(408, b"Request Timeout", message, "request_timeout")
            try:
                self.transport.write(self.conn.send(head) + self.conn.send(h11.Data(data=body)) +
                                     self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass  # h11 cannot answer in this state: the connection just closes

        def send_400_response(self, msg: str) -> None:
            """Malformed HTTP: an OpenAI-shaped 400 (uvicorn's is plain text)."""
            head, body = _response(400, b"Bad Request", f"Malformed HTTP request ({msg.rstrip('.')}).",
                                   "invalid_http")
            try:
                self.transport.write(self.conn.send(head) + self.conn.send(h11.Data(data=body)) +
                                     self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return Connection


TIMED_OUT = "localctx.timed_out"  # set in a request's scope when its body timed out


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
