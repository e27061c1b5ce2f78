"""RULER-style evaluation (issue 25): what a cell costs, and what parallel sequences save.

cost:     seconds per cell of the grid already computed into the cache (by `localctx eval ruler`
          with LOCALCTX_CACHE_DIR=benchmarks/results/cache), per length and preset: the mean over
          the cells (RULER counts length as prompt + generated tokens).
spread:   the bootstrap standard error of each mean (samples redrawn within each task, 2,000
          times, seed 0), and of each preset's difference from native at the same length (the same
          prompts, so the draws are paired): how far 5 samples per cell can be trusted.
parallel: one sample of every task at one length on a fresh cache, --parallel 1 against N in
          this process: the time ratio and how many answers are identical (they must all be).

    LOCALCTX_CACHE_DIR=benchmarks/results/cache .venv/bin/python benchmarks/bench_ruler.py \\
        --presets native,yarn-16k,yarn-32k,ntk-32k,self-extend-32k,auto --lengths 2k,4k,8k \\
        --parallel 4 --json benchmarks/results/ruler.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from localctx.evaluate import CellCache, RulerRequest, load_text, parse_lengths, run_ruler, summarize
from localctx.runtime import RunSpec


def cost(presets: list[str], lengths: list[int], samples: int) -> dict:
    """Seconds per cached cell, per preset and length (cells shared between presets counted in each)."""
    request = RulerRequest(presets, lengths, load_text(None), samples=samples)
    result = run_ruler(request, RunSpec(), compute=False)
    out: dict = {}
    for p in presets:
        for n in lengths:
            secs = [c["seconds"] for c in result.cells if c["preset"] == p and c["length"] == n and c["status"] == "ok"]
            if secs:
                out.setdefault(p, {})[str(n)] = {"cells": len(secs), "mean_s": round(statistics.mean(secs), 2),
                                                 "total_min": round(sum(secs) / 60, 1)}
    summary = summarize(result)
    return {"per_cell": out, "summary": summary.to_dict(), "spread": spread(result.cells, presets, lengths)}


def spread(cells: list, presets: list[str], lengths: list[int], reps: int = 2000) -> dict:
    """Bootstrap standard errors of each (preset, length) mean over the tasks, and of its
    difference from native's (paired: sample i of a task is the same prompt for every preset)."""
    scores: dict = {}
    for c in cells:
        if c["status"] == "ok":
            scores.setdefault((c["preset"], c["length"]), {}).setdefault(c["task"], {})[c["sample"]] = c["score"]
    rng, out = random.Random(0), {}
    for n in lengths:
        base = scores.get(("native", n))
        for p in presets:
            mine = scores.get((p, n))
            if not mine or any(len(v) != len(next(iter(mine.values()))) for v in mine.values()):
                continue
            paired = bool(base) and set(base) == set(mine) and all(set(base[t]) == set(mine[t]) for t in mine)
            means, diffs = [], []
            for _ in range(reps):
                draw = {t: [rng.choice(sorted(v)) for _ in v] for t, v in mine.items()}
                means.append(statistics.mean(statistics.mean(mine[t][i] for i in d) for t, d in draw.items()))
                if paired:
                    diffs.append(means[-1] - statistics.mean(statistics.mean(base[t][i] for i in d)
                                                             for t, d in draw.items()))
            row = {"mean": round(statistics.mean(statistics.mean(v.values()) for v in mine.values()), 3),
                   "se": round(statistics.stdev(means), 3)}
            if diffs and p != "native":
                row["minus_native"] = round(row["mean"] - statistics.mean(statistics.mean(v.values())
                                                                          for v in base.values()), 3)
                row["minus_native_se"] = round(statistics.stdev(diffs), 3)
            out.setdefault(p, {})[str(n)] = row
    return out


def parallel(length: int, n: int, preset: str) -> dict:
    def run(k: int) -> tuple[float, list]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = run_ruler(RulerRequest([preset], [length], load_text(None), samples=1, parallel=k), RunSpec(),
                               cache=CellCache(Path(tmp)))
            return time.perf_counter() - start, [(c["task"], c["answer"]) for c in result.cells]

    one, answers_one = run(1)
    many, answers_many = run(n)
    return {"preset": preset, "length": length, "cells": len(answers_one), "parallel_1_s": round(one, 1),
            f"parallel_{n}_s": round(many, 1), "speedup": round(one / many, 2),
            "identical": sum(a == b for a, b in zip(answers_one, answers_many))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="native,yarn-16k,yarn-32k,ntk-32k,self-extend-32k,auto")
    parser.add_argument("--lengths", default="2k,4k,8k")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=4, help="0: skip the parallel comparison")
    parser.add_argument("--parallel-length", default="2k")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"cost": cost(args.presets.split(","), parse_lengths(args.lengths), args.samples)}
    print("cost:", json.dumps(out["cost"]["per_cell"]), flush=True)
    print("spread:", json.dumps(out["cost"]["spread"]), flush=True)
    if args.parallel:
        out["parallel"] = parallel(parse_lengths(args.parallel_length)[0], args.parallel, "native")
        print("parallel:", out["parallel"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
