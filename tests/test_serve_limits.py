"""`localctx serve` under abuse (localctx/serve/limits.py): a real server on a loopback port with
small limits, driven by raw sockets: connections over --max-connections get 503 while /health
answers, a request head or body that comes too slowly is cut off, and a flood of bad connections
writes a few log lines, not one per connection."""
from __future__ import annotations

import json
import re
import resource
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from test_serve import KEY, Server, start_server, serving

MAX_CONNECTIONS = 4
HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("limits-home"), "--api-key", KEY,
                       "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT),
                       "--body-timeout", str(BODY_TIMEOUT)) as srv:
        yield srv


def connect(server: Server) -> socket.socket:
    return socket.create_connection(server.host_port, timeout=10)


def request(sock: socket.socket, path: str, method: str = "GET", body: str = "") -> tuple[int, dict]:
    """One request on `sock`, read to the end of the (closed, or Content-Length) response."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    sock.sendall((head + "\r\n" + body).encode())
    return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def closed_after(sock: socket.socket, limit: float, drip: bytes = b"") -> float:
    """Seconds until the server closes `sock` (sending `drip` every half second meanwhile)."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < limit:
        try:
            if drip:
                sock.sendall(drip)
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - start
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    pytest.fail(f"the server kept the connection open over {limit} s")


def test_connections_over_the_limit_get_503_and_health_answers(server: Server) -> None:
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]  # each holds a connection, sending nothing
    try:
        time.sleep(0.2)  # accepted by now
        for _ in range(3):
            with connect(server) as extra:
                status, body = request(extra, "/v1/models")
                assert status == 503, body
                assert set(body["error"]) == {"message", "type", "param", "code"}
                assert body["error"]["code"] == "too_many_connections"
                assert extra.recv(1) == b""  # and the connection is closed
        with connect(server) as probe:
            status, health = request(probe, "/health")
            assert status == 200 and health["status"] == "ok"
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5  # the idle ones gone, a request is served again
    while True:
        with connect(server) as sock:
            status, body = request(sock, "/v1/models")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200 and body["data"], body


def test_a_slow_request_head_is_closed_after_the_header_timeout(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        took = closed_after(sock, HEADER_TIMEOUT + 5, drip=b"X-a: b\r\n")  # slowloris: a header line at a time
    assert HEADER_TIMEOUT - 0.5 <= took <= HEADER_TIMEOUT + 2, took


def test_a_slow_body_gets_408(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Length: 100\r\n\r\n{\"prompt\"".encode())
        start = time.monotonic()
        sock.settimeout(BODY_TIMEOUT + 5)
        status, body = read_response(sock)
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert BODY_TIMEOUT - 0.5 <= time.monotonic() - start <= BODY_TIMEOUT + 2
        assert closed_after(sock, 3) < 3


def test_an_unfinished_request_head_over_16k_gets_400(server: Server) -> None:
    with connect(server) as sock:  # h11 buffers at most 16 KiB of a head it cannot parse yet
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        status, body = read_response(sock)
        assert status == 400 and body["error"]["code"] == "invalid_http", body
        assert closed_after(sock, 3) < 3


def test_a_flood_of_bad_connections_logs_a_few_lines(server: Server) -> None:
    before = len(server.log_text().splitlines())
    for _ in range(200):  # malformed HTTP: each gets an OpenAI-shaped 400 and is closed
        with connect(server) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            status, body = read_response(sock)
            assert status == 400 and body["error"]["code"] == "invalid_http", body
    idle = [connect(server) for _ in range(60)]  # over the limit, then closed for sending nothing
    try:
        for s in idle:
            closed_after(s, HEADER_TIMEOUT + 5)
    finally:
        for s in idle:
            s.close()
    time.sleep(1.1)
    with connect(server) as sock:  # one more a second later: its line counts those held back
        sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert read_response(sock)[0] == 400
    with connect(server) as sock:  # still serving
        assert request(sock, "/health")[0] == 200
    time.sleep(0.2)
    lines = server.log_text().splitlines()[before:]
    assert len(lines) <= 12, "\n".join(lines)
    assert any(re.search(r"\(\d+ more like this suppressed\)", ln) for ln in lines), "\n".join(lines)


def test_a_flood_of_health_checks_logs_a_line_a_second(server: Server) -> None:
    before = len(server.log_text().splitlines())
    start = time.monotonic()
    for _ in range(300):  # valid requests, as fast as one client sends them
        with connect(server) as sock:
            assert request(sock, "/health")[0] == 200
    seconds = time.monotonic() - start
    time.sleep(1.1)
    with connect(server) as sock:  # a second later: its line counts those held back
        assert request(sock, "/health")[0] == 200
    time.sleep(0.2)
    lines = [ln for ln in server.log_text().splitlines()[before:] if "GET /health" in ln]
    assert 1 <= len(lines) <= seconds + 3, "\n".join(lines)
    held = sum(int(m.group(1)) for ln in lines if (m := re.search(r"\((\d+) more like this suppressed\)", ln)))
    assert held >= 300 - len(lines), "\n".join(lines)


def test_cli_defaults_are_the_library_defaults() -> None:
    from localctx.commands import serve as command
    from localctx.serve.limits import Limits

    assert Limits() == Limits(command.DEFAULT_MAX_CONNECTIONS, command.DEFAULT_HEADER_TIMEOUT,
                              command.DEFAULT_BODY_TIMEOUT)


def test_rate_limit_counts_what_it_suppresses() -> None:
    from localctx.serve.limits import RateLimit

    now = [0.0]
    limit = RateLimit(1.0, clock=lambda: now[0])
    assert limit.allow("a") == 0
    assert [limit.allow("a") for _ in range(5)] == [None] * 5
    assert limit.allow("b") == 0  # another kind is not held back
    now[0] = 1.0
    assert limit.allow("a") == 5



FD_LIMIT = 320  # the server's soft and hard RLIMIT_NOFILE: room for ~200 connections


def test_a_flood_past_the_descriptor_limit_gives_way_to_new_clients(tmp_path_factory: pytest.TempPathFactory
                                                                     ) -> None:
    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    srv = start_server(tmp_path_factory.mktemp("fd-home"), preexec_fn=few_fds)
    flood: list[socket.socket] = []
    try:
        assert "--max-connections lowered to" in srv.log_text()
        for _ in range(2 * FD_LIMIT):  # twice what the server can hold, all idle
            flood.append(socket.create_connection(srv.host_port, timeout=5))
        time.sleep(0.3)
        for _ in range(5):  # the oldest idle ones make room: /health answers each time, at once
            start = time.monotonic()
            with socket.create_connection(srv.host_port, timeout=5) as sock:
                status, health = request(sock, "/health")
            assert status == 200 and time.monotonic() - start < 1.0
        closed = 0
        for s in flood:
            s.setblocking(False)
            try:
                closed += s.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= FD_LIMIT  # the server held no more than its descriptors allow
    finally:
        for s in flood:
            s.close()
        if srv.proc.poll() is None:
            srv.stop(signal.SIGINT)
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.log_text()
    assert srv.proc.returncode == 0 and "Traceback" not in log and "Too many open files" not in log, log
    assert len(log.splitlines()) < 20, log
