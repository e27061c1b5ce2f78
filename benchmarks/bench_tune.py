"""`localctx tune` (issue 26): what a search costs, what --workers 2 saves, and whether the tuned
parameters hold on a text the search never saw.

workers:  one search on the default model under a 1,024-token header (the test suite's model:
          crossing its window costs seconds), target 2K, from an empty cache each time: one
          process (all cores' threads) against --workers N (a local Ray runtime, one thread per
          worker, N trials asked at once). Wall time of the whole command, per trial, and the ratio.
transfer: presets (the default YaRN, a search's tuned-NAME, any of its trial files) at the target,
          on the text the search ran on and on another: perplexity (eval ppl's span) and the
          search's retrieval tasks, as eval cells (cached: the search's own are found, a rerun
          computes nothing). A preset of per-dimension factors (a rope-freqs search's) is baked
          into a temporary copy of the model and run from it, as the search ran its trials.

    .venv/bin/python benchmarks/bench_tune.py workers --trials 6 --workers 2 [--json FILE]
    LOCALCTX_CACHE_DIR=benchmarks/results/cache .venv/bin/python benchmarks/bench_tune.py transfer \\
        --presets yarn-16k,tuned-NAME --target 16k --texts pride_and_prejudice.txt,alice.txt \\
        --retrieval niah_single_2 --samples 1 [--json FILE]
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CORPUS

from localctx.evaluate import PplRequest, RulerRequest, load_text, parse_lengths, parse_tasks, run_ppl, run_ruler
from localctx.convert import convert
from localctx.runtime import RunSpec, resolve_spec
from localctx.tune import DEFAULT_RETRIEVAL

LOCALCTX = [sys.executable, "-m", "localctx"]


def short_model(folder: Path) -> Path:
    """The default model's weights under a header that says it was trained on 1,024 tokens."""
    from gguf import Keys

    from localctx.convert import override_metadata, plan_conversion, write_converted
    from localctx.gguf_meta import arch_key
    from localctx.paths import default_model_path

    plan = plan_conversion(default_model_path(), "native")
    out = folder / "smollm2-trained-1k.gguf"
    write_converted(override_metadata(plan, {arch_key(Keys.LLM.CONTEXT_LENGTH, "llama"): 1024}), out)
    return out


def search(model: Path, trials: int, workers: int, folder: Path) -> dict:
    """One whole `localctx tune` from an empty cache (its own cache and presets directories)."""
    env = dict(os.environ, LOCALCTX_CACHE_DIR=str(folder / "cache"), LOCALCTX_HOME=str(folder / "home"))
    cmd = [*LOCALCTX, "tune", "-m", str(model), "--target", "2k", "--trials", str(trials),
           "--text", str(CORPUS / "alice.txt"), "--name", "bench", "--json"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return {"workers": workers, "seconds": round(seconds, 1), "per_trial_s": round(seconds / trials, 1),
            "cells": result["computed"], "best_ppl": round(result["best"]["ppl"], 3),
            "default_ppl": round(result["default"]["ppl"], 3)}


def workers(trials: int, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = short_model(Path(tmp))
        one = search(model, trials, 1, Path(tmp) / "one")
        print("one process:", one, flush=True)
        many = search(model, trials, n, Path(tmp) / "many")
        print(f"--workers {n}:", many, flush=True)
    return {"trials": trials, "one": one, "many": many, "speedup": round(one["seconds"] / many["seconds"], 2)}


def transfer(presets: list[str], target: int, texts: list[str], retrieval: list[str], samples: int, seed: int) -> dict:
    """Perplexity and retrieval of each preset (the default YaRN, the tuned one, any trial's file)
    at the target on each text: the same cells as the search's, so the text it was tuned on is cached."""
    out: dict = {}
    for name in texts:
        text = load_text(CORPUS / name)
        for p in presets:
            with tempfile.TemporaryDirectory() as tmp:
                run, spec = _runnable(p, target, Path(tmp))
                ppl = run_ppl(PplRequest([run], [target], text), spec, progress=print_err)
                hits = run_ruler(RulerRequest([run], [target], text, retrieval, samples=samples, seed=seed), spec,
                                 progress=print_err)
            scores = [c["score"] for c in hits.cells]
            out.setdefault(name, {})[Path(p).stem] = {
                "ppl": round(ppl.cells[0]["ppl"], 3),
                "retrieval": round(sum(scores) / len(scores), 2), "retrieval_cells": len(scores)}
        print(name, json.dumps(out[name]), flush=True)
    return {"target": target, "presets": presets, "retrieval": retrieval, "samples": samples, "texts": out}


def _runnable(preset: str, target: int, folder: Path) -> tuple[str, RunSpec]:
    """The preset as the search ran it: per-dimension factors only from a converted file."""
    if not resolve_spec(RunSpec(preset=preset)).params.rope_freqs:
        return preset, RunSpec()
    baked = folder / "baked.gguf"
    convert(str(resolve_spec(RunSpec()).facts.path), baked, preset, force=True)
    return "native", RunSpec(model=str(baked), ctx=math.ceil(target / 256) * 256)


def print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("workers")
    w.add_argument("--trials", type=int, default=6)
    w.add_argument("--workers", type=int, default=2)
    t = sub.add_parser("transfer")
    t.add_argument("--presets", required=True, help="comma-separated: names or preset files")
    t.add_argument("--target", default="16k")
    t.add_argument("--texts", default="pride_and_prejudice.txt,alice.txt")
    t.add_argument("--retrieval", default=",".join(DEFAULT_RETRIEVAL))
    t.add_argument("--samples", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    for p in (w, t):
        p.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.what == "workers":
        out = workers(args.trials, args.workers)
    else:
        out = transfer(args.presets.split(","), parse_lengths(args.target)[0], args.texts.split(","),
                       parse_tasks(args.retrieval), args.samples, args.seed)
    print(json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
