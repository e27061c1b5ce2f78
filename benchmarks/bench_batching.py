"""Parallel sequences in one process (issue 23), against one at a time, in one run:

summarize: 8 short documents (one pass each) with parallel=8 against parallel=1, fresh stores;
           the time ratio, and how many summaries are identical.
passkey:   6 cells of one window (native, 1,024 tokens) with parallel=6 against 1.
threads:   an exact engine (eval, summarize, Ray) against a plain one, 1 thread against 2:
           the largest logit difference after 24 generated tokens past 512 cells.

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_batching.py --json benchmarks/results/batching.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import CORPUS

from localctx.evaluate import CellCache, PasskeyRequest, run_passkey
from localctx.memory import Workload
from localctx.runtime import RunSpec, open_engine
from localctx.summarize import SummarizeOptions, summarize_batch


def summarize(text: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOCALCTX_CACHE_DIR"] = tmp
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for i in range(8):
            (docs / f"d{i}.txt").write_text(text[i * 5000 : i * 5000 + 1500])
        start = time.perf_counter()
        result = summarize_batch([str(docs)], RunSpec(preset="native", ctx=2048),
                                 SummarizeOptions(max_summary_tokens=128, parallel=n))
        return {"seconds": round(time.perf_counter() - start, 2), "summaries": [r["summary"] for r in result.records],
                "generated_tokens": sum(c.get("generated_tokens", 0) for r in result.records for c in r.get("calls", []))}


def passkey(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_passkey(PasskeyRequest(["native"], [1024], [0.5], trials=6, parallel=n), RunSpec(ctx=2048),
                             cache=CellCache(Path(tmp)))
        return {"seconds": round(time.perf_counter() - start, 2), "answers": [c["answer"] for c in result.cells]}


def threads(text: str) -> dict:
    found = {}
    for exact in (True, False):
        for t in (1, 2):
            with open_engine(RunSpec(preset="native", ctx=2048, threads=t, kv_cache=False),
                             workload=Workload("generate", 1, exact=exact)) as e:
                g = e.complete(e.tokenize(text[:3000]), max_tokens=24)
                found[exact, t] = (g.text, e.last_logits())
    return {("exact" if ex else "plain"): {"same_text": found[ex, 1][0] == found[ex, 2][0],
                                           "max_logit_diff": float(np.abs(found[ex, 1][1] - found[ex, 2][1]).max())}
            for ex in (True, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    text = (CORPUS / "alice.txt").read_text(encoding="utf-8")
    out: dict = {}
    one, many = summarize(text, 1), summarize(text, 8)
    out["summarize"] = {"parallel_1_s": one["seconds"], "parallel_8_s": many["seconds"],
                        "speedup": round(one["seconds"] / many["seconds"], 2),
                        "identical": sum(a == b for a, b in zip(one["summaries"], many["summaries"])), "documents": 8}
    print("summarize:", out["summarize"], flush=True)
    one, many = passkey(1), passkey(6)
    out["passkey"] = {"parallel_1_s": one["seconds"], "parallel_6_s": many["seconds"],
                      "speedup": round(one["seconds"] / many["seconds"], 2),
                      "identical": sum(a == b for a, b in zip(one["answers"], many["answers"])), "cells": 6}
    print("passkey:", out["passkey"], flush=True)
    out["threads"] = threads(text)
    print("threads:", out["threads"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
