"""`localctx serve` against llama.cpp's own llama-server under concurrent load, in one run.

Each server in turn (alternating when --rounds > 1) gets the same N distinct chat prompts of
--max-tokens greedy tokens (temperature 0, no ignore_eos, so both may stop early at the same place):
  one_client: one request at a time; completion tok/s = sum of completion tokens / sum of latencies.
  load:       all N at once (one thread each, released together); aggregate tok/s = sum of
              completion tokens / wall time from the release to the last response.
Each phase records the CPU time other processes took meanwhile (others_share; warned above 5%).
Completion tokens come from each response's `usage`; they are checked against the answer's text
re-tokenized with the model's own vocabulary, so a server that miscounts is caught. The ratios are
localctx / llama-server (issue 23's targets: >= 0.95 for one client, >= 0.9 under load).

llama-server is built from the llama.cpp vendored in the pinned llama-cpp-python with this
install's CMAKE_ARGS (scripts/build_llama_server.sh, built once and cached):

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_parallel.py \\
        --requests 8 --max-tokens 64 --json benchmarks/results/parallel.json
    ... --localctx-args "--parallel 8"      # flags for `localctx serve` (after --port 0)
"""
from __future__ import annotations

import llama_cpp  # first: llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai

from localctx.paths import default_model_path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a walk through a forest in autumn.", "Write a letter to a friend about a trip to the sea.",
           "Tell me about the history of the printing press.", "Explain why the sky is blue.",
           "Write a poem about a city at night.", "Describe how bread is made, step by step."]
LLAMA_SERVER_ARGS = "-np 8 -c 16384 -t 2"  # the earlier measurement: 8 slots of 2,048 tokens
START_SECONDS = 180


class Server:
    """A server process on a free local port, ready when its log says so or /health answers 200."""

    def __init__(self, name: str, command: list[str], home: Path, ready: str | None = None) -> None:
        self.name, self.command = name, command
        self.log = home / f"{name}-{time.time_ns()}.log"
        env = {**os.environ, "LOCALCTX_HOME": str(home), "LOCALCTX_CACHE_DIR": str(home / "cache")}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = self._wait(ready)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=900)

    def _wait(self, ready: str | None) -> str:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.proc.poll() is None:
            url = self._url_from_log() if ready is None else ready
            if url and healthy(url):
                return url
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} did not start ({shlex.join(self.command)}):\n{self.log.read_text()[-4000:]}")

    def _url_from_log(self) -> str | None:
        match = re.search(r" on (http://\S+?:\d+)", self.log.read_text())
        return match.group(1) if match else None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting, 503 while loading
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, args: argparse.Namespace, home: Path) -> Server:
    if name == "localctx":
        command = [sys.executable, "-m", "localctx", "serve", "--port", "0", "--model", str(args.model),
                   *shlex.split(args.localctx_args)]
        return Server(name, command, home)
    port = free_port()
    command = [str(args.llama_server), "-m", str(args.model), *shlex.split(args.llama_args),
               "--host", "127.0.0.1", "--port", str(port)]
    return Server(name, command, home, ready=f"http://127.0.0.1:{port}")


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + (f" (Version {i // len(PROMPTS) + 1}.)" if i >= len(PROMPTS) else "")
            for i in range(n)]


def chat(server: Server, prompt: str, max_tokens: int) -> dict[str, Any]:
    start_ = time.perf_counter()
    out = server.client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0)
    seconds = time.perf_counter() - start_
    if out.usage is None or not out.usage.completion_tokens:
        raise SystemExit(f"{server.name}: no usage.completion_tokens in the response: {out}")
    return {"seconds": seconds, "completion_tokens": out.usage.completion_tokens,
            "prompt_tokens": out.usage.prompt_tokens, "finish_reason": out.choices[0].finish_reason,
            "text": out.choices[0].message.content or ""}


def one_at_a_time(server: Server, todo: list[str], max_tokens: int) -> dict[str, Any]:
    runs = [chat(server, p, max_tokens) for p in todo]
    tokens = sum(r["completion_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return summary(runs, tokens, seconds)


def all_at_once(server: Server, todo: list[str], max_tokens: int) -> dict[str, Any]:
    runs: list[dict[str, Any] | None] = [None] * len(todo)
    errors: list[str] = []
    gate = threading.Barrier(len(todo) + 1)

    def one(i: int) -> None:
        gate.wait()
        try:
            runs[i] = chat(server, todo[i], max_tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below, after every thread has finished
            errors.append(f"request {i}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(todo))]
    for t in threads:
        t.start()
    gate.wait()
    start_ = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start_
    if errors:
        raise SystemExit(f"{server.name}: " + "; ".join(errors))
    done = [r for r in runs if r is not None]
    return summary(done, sum(r["completion_tokens"] for r in done), wall)


def summary(runs: list[dict[str, Any]], tokens: int, seconds: float) -> dict[str, Any]:
    latencies = sorted(r["seconds"] for r in runs)
    return {"completion_tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1),
            "latency_s": {"min": round(latencies[0], 3), "median": round(statistics.median(latencies), 3),
                          "max": round(latencies[-1], 3)},
            "finish_reasons": sorted({r["finish_reason"] for r in runs}),
            "runs": runs}


def usage_check(vocab: llama_cpp.Llama, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """usage.completion_tokens against the answer re-tokenized: equal, or one more when the answer
    ended on an end-of-generation token (which has no text), up to re-tokenization's own drift."""
    diffs = [r["completion_tokens"] - len(vocab.tokenize(r["text"].encode(), add_bos=False, special=False))
             for r in runs]
    return {"max_abs_diff": max(abs(d) for d in diffs), "diffs": diffs}


def cpu_sample(pid: int) -> tuple[float, float, float, float, float]:
    """Seconds of CPU: the whole machine busy, stolen by the hypervisor, the server, this process; and now."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]  # user nice system irq softirq
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    me = os.times()
    return busy / tick, cpu[7] / tick, (int(fields[11]) + int(fields[12])) / tick, me.user + me.system, time.monotonic()


def cpu_used(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, Any]:
    """What else ran during a phase: the machine is shared, and two llama.cpp threads that lose a
    core to another process slow down far more than their share (each step waits for both)."""
    busy, steal, server, me, wall = (b - a for a, b in zip(before, after))
    others = max(0.0, busy - server - me)
    return {"server_cpu_s": round(server, 2), "client_cpu_s": round(me, 2), "others_cpu_s": round(others, 2),
            "others_share": round((others + steal) / (wall * (os.cpu_count() or 1)), 3)}


def phase(server: Server, how: Any, todo: list[str], max_tokens: int, vocab: llama_cpp.Llama) -> dict[str, Any]:
    before = cpu_sample(server.proc.pid)
    result = how(server, todo, max_tokens)
    result["cpu"] = cpu_used(before, cpu_sample(server.proc.pid))
    result["usage_check"] = usage_check(vocab, result["runs"])
    if result["cpu"]["others_share"] > 0.05:
        print(f"   warning: other processes had {result['cpu']['others_share']:.0%} of the CPU during "
              f"{server.name} {how.__name__}; the figures are not clean", file=sys.stderr, flush=True)
    return result


def measure(server: Server, todo: list[str], args: argparse.Namespace, vocab: llama_cpp.Llama) -> dict[str, Any]:
    # Warm-up, one alone and N at once (other prompts, few tokens): first-use costs (compute graphs
    # for each batch size, the KV cache's pages) belong to neither measurement.
    chat(server, "Say hello.", 8)
    all_at_once(server, [f"Count to {i + 3}." for i in range(len(todo))], 8)
    result = {"one_client": phase(server, one_at_a_time, todo, args.max_tokens, vocab),
              "load": phase(server, all_at_once, todo, args.max_tokens, vocab)}
    for case in result.values():
        for r in case["runs"]:
            r["seconds"] = round(r["seconds"], 3)
            r["text"] = r["text"][:120]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    todo = prompts(args.requests)
    vocab = llama_cpp.Llama(model_path=str(args.model), vocab_only=True, verbose=False)
    servers = args.servers.split(",")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in servers if round_ % 2 == 0 else servers[::-1]:
                print(f"== round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                server = start(name, args, Path(tmp))
                try:
                    rounds[name].append({"loadavg_before": os.getloadavg()[0], **measure(server, todo, args, vocab)})
                finally:
                    server.stop()
                row = rounds[name][-1]
                print(f"   one client {row['one_client']['tok_per_s']} tok/s, "
                      f"{args.requests} at once {row['load']['tok_per_s']} tok/s", file=sys.stderr, flush=True)
    return report(args, rounds)


def report(args: argparse.Namespace, rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds, "model": str(args.model),
        "localctx_command": f"localctx serve --port 0 --model MODEL {args.localctx_args}".strip(),
        "llama_server_command": f"{args.llama_server} -m MODEL {args.llama_args}",
        "cmake_args": llama_server_cmake_args(args.llama_server), "servers": {}}
    for name, rows in rounds.items():
        out["servers"][name] = {
            "one_client_tok_per_s": statistics.median(r["one_client"]["tok_per_s"] for r in rows),
            "load_tok_per_s": statistics.median(r["load"]["tok_per_s"] for r in rows),
            "load_latency_median_s": statistics.median(r["load"]["latency_s"]["median"] for r in rows),
            "others_cpu_share_max": max(r[c]["cpu"]["others_share"] for r in rows for c in ("one_client", "load")),
            "rounds": rows}
    ours, theirs = out["servers"].get("localctx"), out["servers"].get("llama-server")
    if ours and theirs:
        out["ratio_one_client"] = round(ours["one_client_tok_per_s"] / theirs["one_client_tok_per_s"], 3)
        out["ratio_load"] = round(ours["load_tok_per_s"] / theirs["load_tok_per_s"], 3)
        out["same_answers_one_client"] = [  # texts cut to 120 characters
            a["text"] == b["text"] for a, b in zip(ours["rounds"][0]["one_client"]["runs"],
                                                   theirs["rounds"][0]["one_client"]["runs"])]
    return out


def llama_server_cmake_args(binary: Path | None) -> str | None:
    recorded = binary.parent / "cmake-args" if binary else None
    return recorded.read_text().strip() if recorded and recorded.is_file() else None


def build_llama_server() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "build_llama_server.sh")], check=True, text=True,
                         stdout=subprocess.PIPE, env={**os.environ, "LOCALCTX_VENV": str(Path(sys.prefix))})
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--servers", default="localctx,llama-server", help="comma-separated: localctx, llama-server")
    ap.add_argument("--requests", type=int, default=8, help="distinct prompts; all of them at once under load")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every server, alternating the order; "
                                                          "the summary is the median")
    ap.add_argument("--localctx-args", default="", help="flags for `localctx serve`, e.g. \"--parallel 8\"")
    ap.add_argument("--llama-server", type=Path,
                    help="llama-server binary [default: scripts/build_llama_server.sh's, built if needed]")
    ap.add_argument("--llama-args", default=LLAMA_SERVER_ARGS, help="flags for llama-server besides -m, --port")
    ap.add_argument("--model", type=Path, help="GGUF for llama-server [default: localctx's default model]")
    args = ap.parse_args()
    args.model = args.model or default_model_path()
    if "llama-server" in args.servers.split(","):
        args.llama_server = args.llama_server or build_llama_server()
    result = run(args)
    summary_keys = ("ratio_one_client", "ratio_load", "same_answers_one_client")
    brief = {name: {k: v for k, v in s.items() if k != "rounds"} for name, s in result["servers"].items()}
    print(json.dumps({"servers": brief, **{k: result[k] for k in summary_keys if k in result}}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
