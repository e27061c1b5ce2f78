"""`localctx serve`'s accounting as a client sees it: `usage.prompt_tokens_details.cached_tokens`
through the official `openai` client, and `/metrics` parsed as Prometheus text. One real server
(`--parallel 1`, so an unrelated request takes the one sequence's cells and the document comes back
from its KV snapshot)."""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from test_serve import KEY, Server, serving

PING = 0.2
DOC = " ".join(f"Line {i}: the lighthouse keeper counted {i * 7} gulls." for i in range(12))  # > 64 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("metrics-home"), "--api-key", KEY, "--parallel", "1",
                       "--sse-ping-interval", str(PING)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def scrape(server: Server, key: str | None = KEY) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*server.host_port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    return response.status, response.read().decode()


SAMPLE = re.compile(r'^(localctx_[a-z_]+)(?:\{((?:[a-z_]+="[^"]*",?)*)\})? (-?[0-9.e+]+)$')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format, strictly: every line a HELP, a TYPE or a sample."""
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP localctx_", "# TYPE localctx_")):
            continue
        match = SAMPLE.match(line)
        assert match, f"not Prometheus text: {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def test_a_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour of the sea, in one word."}]
    first = client.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens  # the last prompt token is evaluated again, for its logits
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=2, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_a_restored_document_counts_as_cached_and_a_snapshot_hit(client: openai.OpenAI, server: Server) -> None:
    def ask(question: str) -> openai.types.Completion:
        return client.completions.create(model="x", prompt=DOC + "\n\n" + question, max_tokens=2, temperature=0)

    first = ask("How many gulls on line 3?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # evaluated (and saved), not cached
    assert first.model_extra["localctx"]["saved_tokens"] > 0
    client.completions.create(model="x", prompt="Something else entirely.", max_tokens=2, temperature=0)
    second = ask("How many gulls on line 5?")
    restored = second.model_extra["localctx"]["restored_tokens"]
    assert restored > 0
    assert restored <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    samples = parse(scrape(server)[1])
    assert samples[("localctx_kv_snapshot_hits_total", frozenset())] >= 1
    assert samples[("localctx_kv_snapshot_misses_total", frozenset())] >= 1
    assert samples[("localctx_restored_tokens_total", frozenset())] >= restored


def test_metrics_in_prometheus_text(client: openai.OpenAI, server: Server) -> None:
    assert scrape(server, key=None)[0] == 401  # protected by the key, as llama-server's /metrics
    before = parse(scrape(server)[1])
    out = client.completions.create(model="x", prompt="1, 2, 3,", max_tokens=3, temperature=0)
    status, text = scrape(server)
    assert status == 200
    after = parse(text)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0)

    assert grew("localctx_requests_total", endpoint="/v1/completions", status="200") == 1
    assert grew("localctx_prompt_tokens_total") == out.usage.prompt_tokens
    assert grew("localctx_generated_tokens_total") == out.usage.completion_tokens
    assert after[("localctx_cached_tokens_total", frozenset())] > 0  # the tests before
    assert after[("localctx_requests_running", frozenset())] == 0
    assert after[("localctx_requests_queued", frozenset())] == 0
    assert after[("localctx_window_sequences", frozenset({("window", "1024")}))] == 1
    assert ("localctx_connections_open", frozenset()) in after
    assert grew("localctx_requests_total", endpoint="/metrics", status="200") >= 1


def test_a_long_prompt_streams_pings_and_its_progress(client: openai.OpenAI, server: Server) -> None:
    prompt = "word " * 600  # no paragraph break: no document, so its prefill is stepped and visible
    body = json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True})
    seen: list[dict] = []
    scraped: list[float] = []
    done = threading.Event()

    def watch() -> None:  # /health and /metrics while the prompt is evaluated
        while not done.is_set() and len(seen) < 2000:
            conn = http.client.HTTPConnection(*server.host_port, timeout=10)
            conn.request("GET", "/health")
            seen.extend(json.loads(conn.getresponse().read())["progress"])
            conn.close()
            scraped.extend(v for (name, _), v in parse(scrape(server)[1]).items()
                           if name == "localctx_prompt_tokens_evaluated")
            time.sleep(0.1)  # light: the scrapes share the CPU with the prefill they watch

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with socket.create_connection(server.host_port, timeout=60) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
            stream = b""
            while b"data: [DONE]" not in stream:
                chunk = sock.recv(65536)
                assert chunk, stream
                stream += chunk
    finally:
        done.set()
        watcher.join(timeout=30)
    text = stream.decode()
    first_token = re.search(r'"text": "[^"]', text)
    assert first_token and ": ping\n\n" in text[: first_token.start()], text[:3000]  # pinged before it
    tokens = max(p["prompt_tokens"] for p in seen)
    assert tokens > 500
    assert any(0 < p["prompt_evaluated"] < p["prompt_tokens"] for p in seen), seen[:20]  # part way through
    assert any(0 < v < tokens for v in scraped), scraped[:20]
    # The openai client reads a stream with pings as any other.
    chunks = list(client.completions.create(model="x", prompt=prompt, max_tokens=2, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
