"""eval ppl --parallel (issue 23): windows scored as parallel sequences sharing batches, against one
at a time, in one run.

logits: Engine.logits_many on N windows of different lengths against logits_at on a one-sequence
        exact engine, per preset: the largest logit difference and the rows that differ (positions:
        every 7th and the last 256). --naive cuts each window into even pieces of n_batch / N
        tokens regardless of where a lone run's micro-batches end (what the piece rules prevent).
grid:   `eval ppl` of 6 cells at one window, --parallel 1 against --parallel 6 (fresh caches, in
        this process, alternating which goes first): the times, the ratio, the 1-minute load
        average after each round, whether the perplexities are identical.

    .venv/bin/python benchmarks/bench_ppl_parallel.py --part logits --presets native,yarn-16k
    .venv/bin/python benchmarks/bench_ppl_parallel.py --part grid --json benchmarks/results/ppl_parallel.json
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

from localctx.engine import scoring
from localctx.evaluate import CellCache, PplRequest, load_text, run_ppl
from localctx.memory import Workload
from localctx.runtime import RunSpec, open_engine

GRID_LENGTHS = [1024, 1280, 1536, 1792, 2048, 2304]


def logits(preset: str, lengths: list[int], n: int, threads: int) -> list[dict]:
    spec = RunSpec(preset=preset, threads=threads, kv_cache=False)
    text = (CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    with open_engine(spec, workload=Workload("score", 1, exact=True)) as e:
        tokens = e.tokenize(text)
        requests = [(tokens[i * 5000 : i * 5000 + n_tok],
                     sorted(set(range(0, n_tok - 1, 7)) | set(range(n_tok - 257, n_tok - 1))))
                    for i, n_tok in enumerate(lengths)]
        alone = [e.logits_at(t, p) for t, p in requests]
    with open_engine(spec, workload=Workload("score", n, exact=True)) as e:
        together = e.logits_many(requests)
    return [{"preset": preset, "length": len(t), "max_logit_diff": float(np.abs(a - b).max()),
             "rows_differ": int((np.abs(a - b).max(axis=1) > 0).sum()), "rows": len(p)}
            for (t, p), a, b in zip(requests, alone, together)]


def grid(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_ppl(PplRequest(["native"], GRID_LENGTHS, load_text(CORPUS / "pride_and_prejudice.txt"),
                                    parallel=n), RunSpec(), cache=CellCache(Path(tmp)))
        return {"seconds": round(time.perf_counter() - start, 2), "ppl": [c["ppl"] for c in result.cells]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["logits", "grid"], required=True)
    parser.add_argument("--presets", default="native,yarn-16k")
    parser.add_argument("--lengths", default="1025,1560,2048,3100")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="grid: rounds, alternating which goes first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.naive:
        scoring.pieces = lambda n, chunk, unit, target: [min(target, n - i) for i in range(0, n, target)]
    if args.part == "logits":
        lengths = [int(x) for x in args.lengths.split(",")]
        out = {"logits": [row for preset in args.presets.split(",")
                          for row in logits(preset, lengths, args.parallel, args.threads)]}
        for row in out["logits"]:
            print(row, flush=True)
    else:
        rounds = []
        for r in range(args.rounds):  # alternating which goes first: the CPU's load drifts
            order = (1, 6) if r % 2 == 0 else (6, 1)
            found = {n: grid(n) for n in order}
            rounds.append({"parallel_1_s": found[1]["seconds"], "parallel_6_s": found[6]["seconds"],
                           "speedup": round(found[1]["seconds"] / found[6]["seconds"], 2), "first": order[0],
                           "load_average": os.getloadavg()[0],
                           "identical": sum(a == b for a, b in zip(found[1]["ppl"], found[6]["ppl"]))})
            print(rounds[-1], flush=True)
        out = {"grid": {"lengths": GRID_LENGTHS, "cells": len(GRID_LENGTHS), "rounds": rounds}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
