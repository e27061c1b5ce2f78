"""auto with requests at two steps at once (issue 23): lanes against one context at a time, in one run.

The default model under `auto --ctx 16384` (ladder 8,192 → 16,384) with 4 sequences, as `serve
--parallel 4` opens it: one long request (a prompt past the trained 8K, so the 16,384 step) arrives
first, then 3 short chat-sized ones (the 8,192 step). With lanes the short ones run in the 8,192
context beside the long one; one context at a time (before lanes; the `one_context` run emulates it
here with the same engine) makes them wait until the long one is done. Printed: each short
request's latency (arrival to last token) and the whole batch's time, both ways.

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_lanes.py --json benchmarks/results/lanes.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import statistics
import time
from pathlib import Path

from common import CORPUS

from localctx.memory import Workload
from localctx.runtime import RunSpec, open_engine

SHORT = ["Name three colours.", "What is the capital of France?", "Write a haiku about rain."]


def run(lanes: bool, long_tokens: int, answer: int) -> dict:
    spec = RunSpec(preset="auto", ctx=16384, threads=2, kv_cache=False)
    text = (CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    with open_engine(spec, workload=Workload("generate", 4)) as e:
        long = e.tokenize(text)[:long_tokens]
        shorts = [e.chat_tokens([{"role": "user", "content": q}]) for q in SHORT]
        e.complete(shorts[0], max_tokens=4)  # warm: the 8,192 lane exists, as on a running server
        start = time.perf_counter()
        runs = [e.start(long, max_tokens=answer, mixed=True)]
        waiting = [dict(tokens=t, max_tokens=answer, mixed=True) for t in shorts]
        finished: dict[int, float] = {}
        while e.running or waiting:
            while waiting and (lanes or not e.running) and e.can_start(len(waiting[0]["tokens"]), answer):
                runs.append(e.start(**waiting.pop(0)))
            e.step()
            now = time.perf_counter() - start
            for i, r in enumerate(runs):
                if r.done and i not in finished:
                    finished[i] = now
        windows = [r.gen.window for r in runs]
        texts = [r.gen.text for r in runs]
    short = [finished[i] for i in range(1, len(runs))]
    return {"total_seconds": round(max(finished.values()), 2), "long_seconds": round(finished[0], 2),
            "short_latencies": [round(s, 2) for s in short], "short_mean": round(statistics.mean(short), 2),
            "windows": windows, "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long-tokens", type=int, default=9000)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {"lanes": run(True, args.long_tokens, args.answer), "one_context": run(False, args.long_tokens, args.answer)}
    a, b = out["lanes"], out["one_context"]
    out["short_latency_ratio"] = round(b["short_mean"] / a["short_mean"], 2)
    out["total_ratio"] = round(b["total_seconds"] / a["total_seconds"], 2)
    out["same_texts"] = a["texts"] == b["texts"]
    for name in ("lanes", "one_context"):
        r = out[name]
        print(f"{name:12s} short requests done after {r['short_latencies']} s (mean {r['short_mean']}), "
              f"long after {r['long_seconds']} s, all after {r['total_seconds']} s; windows {r['windows']}")
    print(f"short-request latency: {out['short_latency_ratio']}x lower with lanes; whole batch {out['total_ratio']}x; "
          f"same answers: {out['same_texts']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
