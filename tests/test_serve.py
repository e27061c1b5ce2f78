"""`localctx serve` as a client sees it: a real server subprocess on a free local port, driven by
the official `openai` client and by raw HTTP (http.client / sockets) for what a client library
would never send. One server is started per module (the model loads once); the tests that stop a
server start their own."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from conftest import REPO
from localctx.paths import CACHE_DIR_ENV, USER_DIR_ENV

KEY = "test-key-0123"
CTX = 1024  # small, so an overflowing prompt is short
DOC_TOKENS_MIN = 64  # LOCALCTX_KV_CACHE_MIN_TOKENS for the server: a short document gets a snapshot
STARTUP = 90


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(home: Path, *args: str, preexec_fn: Callable[[], None] | None = None) -> Server:
    log = home / "serve.log"
    env = {**os.environ, USER_DIR_ENV: str(home), "LOCALCTX_KV_CACHE_MIN_TOKENS": str(DOC_TOKENS_MIN)}
    env.pop(CACHE_DIR_ENV, None)
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "localctx", "serve", "--port", "0", "--ctx", str(CTX), *args],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=env, preexec_fn=preexec_fn)
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        match = re.search(r" on (http://\S+?:\d+)", log.read_text(errors="replace"))
        if match:
            return Server(proc, match.group(1), log)
        if proc.poll() is not None:
            pytest.fail(f"localctx serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"localctx serve did not start in {STARTUP} s:\n{log.read_text()}")


@contextmanager
def serving(home: Path, *args: str) -> Iterator[Server]:
    """A server for a module's tests, stopped by Ctrl-C at the end: it must exit 0 and never have
    printed a traceback."""
    srv = start_server(home, *args)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            try:
                assert srv.stop(signal.SIGINT) == 0, srv.log_text()
            finally:
                if srv.proc.poll() is None:
                    srv.proc.kill()
        assert "Traceback" not in srv.log_text(), srv.log_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("serve-home"), "--api-key", KEY, "--max-body-mb", "1")
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            try:
                rc = srv.stop(signal.SIGINT)  # Ctrl-C
            finally:
                if srv.proc.poll() is None:  # never leave a server running after a failure
                    srv.proc.kill()
            log = srv.log_text()
            assert rc == 0, log
            assert "Traceback" not in log, log
            assert log.rstrip().endswith("Stopped."), log


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server: Server, method: str, path: str, body: bytes | str | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A request as raw HTTP; returns the status and the JSON body."""
    conn = http.client.HTTPConnection(*server.host_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_api_error(status: int, body: dict, want_status: int, *fragments: str) -> dict:
    assert status == want_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


USER = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# --- the API through the official client -----------------------------------------------------------


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("SmolLM2") and models[0].owned_by == "localctx"
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    conn.request("GET", "/health")  # no API key needed
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["max_context"] == CTX and health["model"] == models[0].id


def test_chat_streamed_and_not_agree(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="any-name", messages=USER, max_tokens=12, temperature=0)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.model.startswith("SmolLM2")  # the model served, whatever name was asked for
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = full.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    chunks = list(client.chat.completions.create(model="any-name", messages=USER, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer, streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    streamed = chunks[-1].usage
    assert chunks[-1].choices == [] and streamed.model_dump(exclude={"prompt_tokens_details"}) == \
        u.model_dump(exclude={"prompt_tokens_details"})
    assert streamed.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its cells were kept
    # Content as a list of text parts is the same message.
    parts = [{"type": "text", "text": USER[0]["content"][:20]}, {"type": "text", "text": USER[0]["content"][20:]}]
    same = client.chat.completions.create(model="x", messages=[{"role": "user", "content": parts}], max_tokens=12,
                                          temperature=0)
    assert same.choices[0].message.content == choice.message.content and same.usage.prompt_tokens == u.prompt_tokens


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="x", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 3
    parts = list(client.completions.create(model="x", prompt="The capital of France is", max_tokens=6,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_strings_and_sampling_options(client: openai.OpenAI) -> None:
    counted = client.completions.create(model="x", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    assert " 7" in counted.choices[0].text, counted.choices[0].text  # the model counts on
    stopped = client.completions.create(model="x", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
                                        stop=[" 7", "never"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == counted.choices[0].text.split(" 7")[0]
    a, b = (client.chat.completions.create(model="x", messages=USER, max_tokens=8, temperature=1.2, top_p=0.9,
                                           seed=7) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # a seed repeats a sampled answer


def test_overflow_is_refused_with_the_counts(client: openai.OpenAI) -> None:
    long = "word " * 1500
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": long}], max_tokens=16)
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded"
    message = err.body["message"]
    n_prompt = int(re.search(r"prompt is ([\d,]+) tokens", message).group(1).replace(",", ""))
    assert n_prompt > 1500 and "answer budget 16" in message and f"{CTX:,}" in message
    assert "Nothing was truncated" in message
    with pytest.raises(openai.BadRequestError) as info:  # streamed: refused before the stream starts
        client.completions.create(model="x", prompt=long, max_tokens=16, stream=True)
    assert info.value.code == "context_length_exceeded"
    # A prompt that fits, with an answer budget that does not: refused too, never shortened.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="x", prompt="Hello", max_tokens=CTX)
    assert info.value.code == "context_length_exceeded" and f"answer budget {CTX:,}" in info.value.body["message"]


@pytest.mark.slow  # a few seconds alone; over 20 s on a shared 2-core machine
def test_default_budget_is_not_the_rest_of_the_window(client: openai.OpenAI) -> None:
    """No max_tokens: 512 at most, less when the window has less room left (documented)."""
    prompt = "word " * 1000  # about 1,000 tokens of a 1,024 window: less than 512 left
    out = client.completions.create(model="x", prompt=prompt, temperature=0)
    assert out.model_extra["localctx"]["max_tokens"] == CTX - out.usage.prompt_tokens > 0
    short = client.completions.create(model="x", prompt="The capital of France is", temperature=0, stop=["."])
    assert short.model_extra["localctx"]["max_tokens"] == 512


@pytest.mark.slow  # a few seconds alone; over 20 s on a shared 2-core machine
def test_document_snapshot_is_restored_for_another_question(client: openai.OpenAI, corpus: Path) -> None:
    doc = corpus.joinpath("alice.txt").read_text()[:1500]  # about 350 tokens (the server's threshold: 64)

    def ask(question: str) -> dict:
        out = client.chat.completions.create(model="x", max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": f"{doc}\n\n{question}"}])
        return out.model_extra["localctx"]

    first = ask("Who is the story about?")
    assert first["document_tokens"] >= 300 and first["saved_tokens"] == first["document_tokens"]
    client.completions.create(model="x", prompt="Something else entirely.", max_tokens=2)  # evicts the cache
    second = ask("Where does Alice sit?")
    assert second["restored_tokens"] == first["document_tokens"], second

    # No paragraph break in the last user message: the document is the conversation before it.
    def follow_up(question: str) -> dict:
        messages = [{"role": "user", "content": doc.replace("\n\n", "\n")}, {"role": "assistant", "content": "Read."},
                    {"role": "user", "content": question}]
        return client.chat.completions.create(model="x", messages=messages, max_tokens=2,
                                              temperature=0).model_extra["localctx"]

    saved = follow_up("Who is the story about?")
    assert saved["saved_tokens"] == saved["document_tokens"] >= 300
    client.completions.create(model="x", prompt="Something else entirely.", max_tokens=2)
    assert follow_up("Where does Alice sit?")["restored_tokens"] == saved["document_tokens"]


@pytest.mark.slow  # a few seconds alone; over 20 s on a shared 2-core machine
def test_concurrent_clients_all_complete(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    results: dict[int, str] = {}

    def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Say the number {i}."}]
        if i % 2:
            chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=4, stream=True,
                                                         temperature=0))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            out = client.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=0)
            results[i] = out.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))


# --- cancellation ---------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_model(server: Server, client: openai.OpenAI) -> None:
    body = json.dumps({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0, "stream": True})
    sock = socket.create_connection(server.host_port, timeout=60)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 4:  # the stream is under way
        received += sock.recv(4096)
    sock.close()
    gone = time.monotonic()
    out = client.completions.create(model="x", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert out.choices[0].text
    assert time.monotonic() - gone < 20
    lines = [ln for ln in server.log_text().splitlines() if "POST /v1/completions" in ln]
    cancelled = next(ln for ln in lines if "client went away" in ln)
    assert "cancelled" in cancelled and "tokens (" not in cancelled, cancelled  # stopped, never finished
    # Nothing left queued or running.
    deadline = time.monotonic() + 10
    while raw(server, "GET", "/health")[1]["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert raw(server, "GET", "/health")[1]["pending"] == 0


def test_sigterm_stops_a_generation_in_flight(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        body = json.dumps({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0, "stream": True})
        conn = http.client.HTTPConnection(*srv.host_port, timeout=60)
        conn.request("POST", "/v1/completions", body=body)
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the stream is under way
        start = time.monotonic()
        rc = srv.stop(signal.SIGTERM, timeout=30)
        stopped_in = time.monotonic() - start
        rest = response.read().decode()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.log_text()
    assert rc == 0 and "Traceback" not in log, log
    assert stopped_in < 10, log
    assert '"code": "cancelled"' in rest and "[DONE]" not in rest  # the client is told it was cut short
    assert log.rstrip().endswith("Stopped."), log


# --- bad input, over raw HTTP -----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "fragment"), [
    ("{not json", "not valid JSON"),
    ("", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"messages": "hi"}', "'messages' must be an array"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"model": "x"}', "'messages' is required"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "'max_tokens' must be from 1"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "'max_tokens' must be an integer"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "'max_tokens' must be an integer"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "'temperature' must be a number"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "'temperature' must be from 0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "'n' must be 1"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stop": 7}', "'stop' must be"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "'stream' must be a boolean"),
    ('{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', "'seed' must be from 0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "only function tools"),
    ('{"messages": [{"role": "user", "content": "hi"}], "model": 3}', "'model' must be a string"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_bad_chat_requests_get_400(server: Server, body: str, fragment: str) -> None:
    status, reply = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    error = assert_api_error(status, reply, 400, fragment)
    assert error["type"] == "invalid_request_error"


def test_bad_completion_requests_get_400(server: Server) -> None:
    for body, fragment in [('{"prompt": [1, 2, 3]}', "'prompt' must be a string"), ('{"prompt": ""}', "empty"),
                           ('{"prompt": "a", "echo": true}', "'echo' is not supported"),
                           ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be from 1")]:
        assert_api_error(*raw(server, "POST", "/v1/completions", body), 400, fragment)


def test_unknown_routes_and_methods(server: Server) -> None:
    assert_api_error(*raw(server, "GET", "/v1/nothing"), 404)
    assert_api_error(*raw(server, "GET", "/v1/chat/completions"), 405)


def test_oversize_body_gets_413(server: Server) -> None:
    limit = 2**20
    # Announced by Content-Length: refused before the body is read.
    sock = socket.create_connection(server.host_port, timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Length: {limit + 1}\r\n\r\n{{").encode())
    head = b""
    while b"}}" not in head:  # the whole JSON body
        data = sock.recv(65536)
        if not data:
            break
        head += data
    sock.close()
    head = head.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert '"code":"request_too_large"' in head.replace(" ", "")
    # Streamed (chunked, no length): refused once the limit is crossed.
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    piece = b'"' + b"x" * 65534 + b'"'
    conn.request("POST", "/v1/chat/completions", body=iter([b"["] + [piece + b","] * 17 + [b"1]"]),
                 headers={"Authorization": f"Bearer {KEY}"}, encode_chunked=True)
    response = conn.getresponse()
    assert_api_error(response.status, json.loads(response.read()), 413, f"{limit:,} bytes")
    conn.close()
    # The server is still well.
    assert raw(server, "GET", "/health")[0] == 200


def test_api_key(server: Server) -> None:
    body = json.dumps({"messages": USER, "max_tokens": 1})
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        error = assert_api_error(*raw(server, "POST", "/v1/chat/completions", body, headers), 401, "API key")
        assert error["code"] == "invalid_api_key"
    assert raw(server, "POST", "/v1/chat/completions", body)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
