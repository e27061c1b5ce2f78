"""`localctx serve`, measured from a client (the official `openai` package) on this machine.

throughput: the same chat prompts through the server (streamed and not) and through the engine
            called directly in this process (same model, preset and greedy sampling, so the same
            answers), interleaved round by round; generated tokens per second of wall time as the
            client sees it (end to end: prompt, generation, HTTP), and the generation rate alone.
document:   time to first token of questions about a ~12K-token document under --preset auto:
            the first (evaluated, snapshot saved), a second question on the same server (the
            document still in the KV cache), one after an unrelated request (restored from the
            snapshot), and one after a server restart (restored from disk).
concurrent: N clients at once (half streaming), each checked for the response's shape; latency
            from each client's start to its last byte (requests are served in order).

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_serve.py --json benchmarks/results/serve.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from common import CORPUS

import localctx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "Write a letter to a friend about a trip to the sea."]
DOC_CHARS = 50_000  # about 12K tokens of Pride and Prejudice
QUESTIONS = ["Who are the Bennet daughters? Name them.", "Who is Mr. Darcy?", "What does Mrs. Bennet want?",
             "Where do the Bennets live?"]


class Server:
    def __init__(self, home: Path, *args: str) -> None:
        self.log = home / f"serve-{time.time_ns()}.log"
        env = {**os.environ, "LOCALCTX_HOME": str(home), "LOCALCTX_CACHE_DIR": str(home / "cache")}
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "localctx", "serve", "--port", "0", *args],
                                         stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r" on (http://\S+?:\d+)", self.log.read_text())
            if match:
                self.url = match.group(1)
                self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=900)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def chat_streamed(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    text, usage, details = [], None, {}
    for chunk in client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            # The first token: its text, or the end of the answer when the first token ends it.
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].finish_reason:
            details = (chunk.model_extra or {}).get("localctx", {})
    end = time.perf_counter()
    return {"text": "".join(text), "seconds": end - start, "ttft": (first or end) - start,
            "completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens, "localctx": details}


def throughput(home: Path, rounds: int, max_tokens: int) -> dict[str, Any]:
    server = Server(home, "--preset", "auto", "--no-kv-cache")
    rows: dict[str, list[dict[str, float]]] = {"direct": [], "server": [], "server_stream": []}
    same = True
    try:
        with localctx.open_model(preset="auto", kv_cache=False) as engine:
            for _ in range(rounds):
                for prompt in PROMPTS:
                    messages = [{"role": "user", "content": prompt}]
                    start = time.perf_counter()
                    gen = engine.generate(engine.chat_tokens(messages), max_tokens=max_tokens, temperature=0,
                                          stop=engine.chat_stop).finish()
                    direct = time.perf_counter() - start
                    rows["direct"].append({"seconds": direct, "tokens": gen.timings.generated_tokens,
                                           "gen_seconds": gen.timings.generation_seconds})
                    start = time.perf_counter()
                    out = server.client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens,
                                                                temperature=0)
                    rows["server"].append({"seconds": time.perf_counter() - start,
                                           "tokens": out.usage.completion_tokens,
                                           "gen_seconds": out.model_extra["localctx"]["generation_seconds"]})
                    streamed = chat_streamed(server.client, messages, max_tokens)
                    rows["server_stream"].append({"seconds": streamed["seconds"],
                                                  "tokens": streamed["completion_tokens"],
                                                  "gen_seconds": streamed["localctx"]["generation_seconds"]})
                    same &= out.choices[0].message.content == gen.text == streamed["text"]
    finally:
        server.stop()
    result: dict[str, Any] = {"rounds": rounds, "prompts": len(PROMPTS), "max_tokens": max_tokens,
                              "same_answers": same}
    for name, runs in rows.items():
        tokens = sum(r["tokens"] for r in runs)
        result[name] = {"tokens": tokens, "seconds": round(sum(r["seconds"] for r in runs), 2),
                        "end_to_end_tps": round(tokens / sum(r["seconds"] for r in runs), 1),
                        "generation_tps": round(tokens / sum(r["gen_seconds"] for r in runs), 1)}
    for name in ("server", "server_stream"):
        result[f"{name}_ratio_end_to_end"] = round(result[name]["end_to_end_tps"] / result["direct"]["end_to_end_tps"], 3)
        result[f"{name}_ratio_generation"] = round(result[name]["generation_tps"] / result["direct"]["generation_tps"], 3)
    return result


def document(home: Path, max_tokens: int) -> dict[str, Any]:
    doc = (CORPUS / "pride_and_prejudice.txt").read_text()[:DOC_CHARS]
    ask = lambda srv, q: chat_streamed(srv.client, [{"role": "user", "content": f"{doc}\n\n{q}"}], max_tokens)  # noqa: E731
    cases = {}
    server = Server(home, "--preset", "auto")
    try:
        cases["first"] = ask(server, QUESTIONS[0])
        cases["second_same_server"] = ask(server, QUESTIONS[1])
        server.client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        cases["after_unrelated_request"] = ask(server, QUESTIONS[2])
    finally:
        server.stop()
    server = Server(home, "--preset", "auto")
    try:
        cases["after_restart"] = ask(server, QUESTIONS[3])
    finally:
        server.stop()
    out = {}
    for name, c in cases.items():
        d = c["localctx"]
        out[name] = {"ttft_seconds": round(c["ttft"], 2), "total_seconds": round(c["seconds"], 2),
                     "prompt_tokens": c["prompt_tokens"], "window": d.get("window"), "scaling": d.get("scaling"),
                     "document_tokens": d.get("document_tokens"), "restored_tokens": d.get("restored_tokens"),
                     "saved_tokens": d.get("saved_tokens"), "snapshot_seconds": d.get("snapshot_seconds"),
                     "completion_tokens": c["completion_tokens"], "answer": c["text"][:80]}
    first = out["first"]["ttft_seconds"]
    for name in ("second_same_server", "after_unrelated_request", "after_restart"):
        out[name]["speedup_vs_first"] = round(first / out[name]["ttft_seconds"], 1)
    return out


def concurrent(home: Path, clients: int, max_tokens: int) -> dict[str, Any]:
    server = Server(home, "--preset", "auto", "--no-kv-cache")
    latencies: list[float] = [0.0] * clients
    problems: list[str] = []

    def one(i: int) -> None:
        messages = [{"role": "user", "content": f"Tell me a fact about the number {i}."}]
        start = time.perf_counter()
        try:
            if i % 2:
                chunks = list(server.client.chat.completions.create(
                    model="x", messages=messages, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}))
                assert chunks[0].choices[0].delta.role == "assistant"
                assert chunks[-2].choices[0].finish_reason in ("stop", "length")
                u = chunks[-1].usage
                assert chunks[-1].choices == [] and u.total_tokens == u.prompt_tokens + u.completion_tokens
                assert len({c.id for c in chunks}) == 1
            else:
                out = server.client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens)
                assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
                assert out.choices[0].finish_reason in ("stop", "length")
                assert 0 < out.usage.completion_tokens <= max_tokens
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the others
            problems.append(f"client {i}: {exc!r}")
        latencies[i] = time.perf_counter() - start

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        rc = server.stop()
    ordered = sorted(latencies)
    return {"clients": clients, "streaming": clients // 2, "max_tokens": max_tokens, "completed": clients - len(problems),
            "problems": problems, "wall_seconds": round(wall, 2), "server_exit": rc,
            "latency_seconds": {"min": round(ordered[0], 2), "median": round(statistics.median(ordered), 2),
                                "p90": round(ordered[int(0.9 * (clients - 1))], 2), "max": round(ordered[-1], 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cases", default="throughput,concurrent,document")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for case in args.cases.split(","):
            print(f"== {case}", file=sys.stderr, flush=True)
            if case == "throughput":
                results[case] = throughput(home, args.rounds, args.max_tokens)
            elif case == "document":
                results[case] = document(home, 32)
            elif case == "concurrent":
                results[case] = concurrent(home, args.clients, 32)
            print(json.dumps(results[case], indent=2), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
