"""Probe `localctx serve` under abuse, on the loopback interface only, bounded in count and time.

Starts a server (stderr to a file), then at once:
  - polls GET /health on a new connection every 0.25 s, timing each answer;
  - opens `--slowloris` sockets that send a request head one header line a second, never ending it;
  - opens a flood of idle connections (up to `--connections`, as many as this process's file
    descriptors allow, for at most `--flood-seconds`), holds them, and counts those the server closes;
then checks that a normal chat request (the `openai` client) still succeeds, stops the server and
measures its stderr. Prints one JSON object on stdout; progress on stderr.

    python benchmarks/probe_abuse.py                       # this checkout, default limits
    python benchmarks/probe_abuse.py --repo /work/main --connections 2000   # another checkout (before/after)

Targets (issue 24): /health within 1 s throughout, stderr under 1 MB, every slowloris socket closed
after the header timeout, the normal request answered.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only, whatever the arguments


def log(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


def start_server(repo: Path, extra: list[str], err_path: Path, nofile: tuple[int, int] | None
                 ) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    err = err_path.open("w")

    def limit() -> None:  # the server's own descriptor limit, as a smaller machine would give it
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    proc = subprocess.Popen([sys.executable, "-m", "localctx", "serve", "--host", HOST, "--port", "0", "--ctx", "1024",
                             *extra], stdout=subprocess.DEVNULL, stderr=err, cwd=repo, env=env, preexec_fn=limit)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r" on http://127\.0\.0\.1:(\d+)", err_path.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {err_path.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def health_once(port: int, timeout: float = 5.0) -> float | None:
    """Seconds for a GET /health on a new connection; None when it failed or took over `timeout`."""
    start = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return time.monotonic() - start if data.startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


class HealthPoller(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.samples = port, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), health_once(self.port)))
            self.stop.wait(0.25)


class Slowloris(threading.Thread):
    """Sockets that send a request head one line a second; records when the server closes each."""

    def __init__(self, port: int, n: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.n, self.seconds = port, n, seconds
        self.opened: float = 0.0
        self.closed_after: list[float] = []

    def run(self) -> None:
        socks = []
        for _ in range(self.n):
            s = socket.create_connection((HOST, self.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            socks.append(s)
        self.opened = time.monotonic()
        live = set(range(self.n))
        while live and time.monotonic() - self.opened < self.seconds:
            for i in list(live):
                try:
                    socks[i].send(b"X-Slow: 1\r\n")
                    if socks[i].recv(1024) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    self.closed_after.append(time.monotonic() - self.opened)
                    live.discard(i)
            time.sleep(1.0)
        for s in socks:
            s.close()


def flood(port: int, limit: int, seconds: float) -> tuple[list[socket.socket], int, float]:
    socks, failed, start = [], 0, time.monotonic()
    while len(socks) < limit and time.monotonic() - start < seconds:
        try:
            socks.append(socket.create_connection((HOST, port), timeout=3))
        except OSError:
            failed += 1
            if failed > 1000:
                break
    return socks, failed, time.monotonic() - start


def closed_by_server(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1024, socket.MSG_PEEK) == b"":
                n += 1
        except BlockingIOError:
            pass  # still open
        except OSError:
            n += 1  # reset
    return n


def normal_request(port: int) -> bool:
    import openai

    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}],
                                             max_tokens=4, temperature=0)
        return bool(out.choices[0].message.content)
    except openai.OpenAIError as exc:
        log(f"normal request failed: {exc!r}")
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server to run")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--slowloris", type=int, default=20)
    ap.add_argument("--flood-seconds", type=float, default=20.0, help="time allowed to open the flood")
    ap.add_argument("--hold-seconds", type=float, default=15.0, help="how long the flood is held open")
    ap.add_argument("--server-arg", action="append", default=[], help="passed to `localctx serve` (repeatable)")
    ap.add_argument("--server-nofile", metavar="SOFT[:HARD]", help="the server's RLIMIT_NOFILE (default: inherited)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    room = hard - 200 - args.slowloris
    n_flood = max(0, min(args.connections, room))
    err_path = Path(tempfile.mkdtemp(prefix="probe-abuse-")) / "serve.stderr"
    nofile = None
    if args.server_nofile:
        soft_s, _, hard_s = args.server_nofile.partition(":")
        nofile = (int(soft_s), int(hard_s or hard))
    proc, port = start_server(args.repo, args.server_arg, err_path, nofile)
    log(f"server on port {port}; flood of up to {n_flood:,} connections (fd limit {hard:,})")
    out: dict = {"repo": str(args.repo), "connections_asked": args.connections, "server_args": args.server_arg,
                 "server_nofile": nofile}
    socks: list[socket.socket] = []
    try:
        poller = HealthPoller(port)
        poller.start()
        time.sleep(1.0)
        loris = Slowloris(port, args.slowloris, seconds=args.flood_seconds + args.hold_seconds + 10)
        loris.start()
        flood_began = time.monotonic()
        socks, failed, took = flood(port, n_flood, args.flood_seconds)
        log(f"opened {len(socks):,} idle connections in {took:.1f} s ({failed} failed)")
        time.sleep(args.hold_seconds)
        out["flood_opened"], out["flood_failed"], out["flood_open_seconds"] = len(socks), failed, round(took, 1)
        out["flood_closed_by_server"] = closed_by_server(socks)
        for s in socks:
            s.close()
        socks = []
        loris.join(timeout=args.flood_seconds + args.hold_seconds + 15)
        out["slowloris_closed"] = f"{len(loris.closed_after)} of {args.slowloris}"
        out["slowloris_closed_after_s"] = ([round(min(loris.closed_after), 1), round(max(loris.closed_after), 1)]
                                           if loris.closed_after else None)
        out["normal_request_ok"] = normal_request(port)
        poller.stop.set()
        poller.join(timeout=10)
        times = [t for _, t in poller.samples if t is not None]
        out["health_polls"] = len(poller.samples)
        out["health_failed_or_over_5s"] = sum(1 for _, t in poller.samples if t is None)
        out["health_over_1s"] = sum(1 for t in times if t > 1.0)
        out["health_slow_or_failed_at_s"] = [  # seconds after the flood began: which phase was slow
            round(at - flood_began, 1) for at, t in poller.samples if t is None or t > 1.0]
        if times:
            out["health_median_s"] = round(statistics.median(times), 3)
            out["health_max_s"] = round(max(times), 3)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = err_path.read_text(errors="replace")
    out["stderr_bytes"] = err_path.stat().st_size
    out["stderr_lines"] = text.count("\n")
    out["stderr_tracebacks"] = text.count("Traceback")
    out["server_exit"] = proc.returncode
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
