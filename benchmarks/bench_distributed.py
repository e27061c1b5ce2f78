"""Summarize on Ray workers against one process, on the same batch of short documents, in one run:

  0. what the fixed prompt splits (the price of identical results) cost in one process;
  1. one process with T threads (T = all cores) against --workers T (one thread each), wall time
     of the whole batch (runtime start and model loads included, and without them), and whether
     the summaries are identical (to one process with T threads, and with one thread: llama.cpp's
     results depend on the thread count);
  2. the driver's cost per task: a Ray round trip (dispatch + result return) with a model call's
     real payload, and the store write the driver does for it, against a task's own time;
  3. the object store: ray.put of the model file's bytes and ray.get in a worker;
  4. a model of documents/hour against workers 1..16 from these figures (printed with its
     assumptions).

With --parallel N, only this instead: the same batch on one worker (all cores' threads) at
--parallel 1 against --parallel N (the worker runs up to N calls of one actor call as parallel
sequences), each from an empty store, and how many summaries are identical.

    .venv/bin/python benchmarks/bench_distributed.py [--docs 8] [--chars 1200] [--json FILE]
    .venv/bin/python benchmarks/bench_distributed.py --docs 8 --parallel 8 [--json FILE]
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import CORPUS

from localctx.cluster import Cluster
from localctx.distributed import RayExecutor
from localctx.params import default_threads
from localctx.paths import default_model_path
from localctx.runtime import RunSpec
from localctx.summarize import Reporter, SummarizeOptions, summarize_batch
from localctx.summary_store import Store

OPTIONS = SummarizeOptions(max_summary_tokens=48)


class Calls(Reporter):
    """Records every model call's own time (as the worker measured it) and the batch's start."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.first_start: float | None = None

    def batch_start(self, *args: Any) -> None:
        self.first_start = time.perf_counter()

    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None:
        if not info["cached"]:
            self.seconds.append(info["seconds"])


def documents(root: Path, n: int, chars: int) -> list[str]:
    text = (CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    start = text.index("It is a truth")
    paths = []
    for i in range(n):
        path = root / f"doc{i:02d}.txt"
        path.write_text(text[start + i * chars: start + (i + 1) * chars], encoding="utf-8")
        paths.append(str(path))
    return paths


def batch(paths: list[str], spec: RunSpec, executor: RayExecutor | None,
          options: SummarizeOptions = OPTIONS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        os.environ["LOCALCTX_HOME"] = home  # an empty store: every call is made
        calls = Calls()
        start = time.perf_counter()
        result = summarize_batch(paths, spec, options, reporter=calls, executor=executor)
        end = time.perf_counter()
    failed = [r for r in result.records if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"failed: {failed}")
    return {"seconds": end - start, "after_start": end - (calls.first_start or start),
            "calls": len(calls.seconds), "call_seconds": statistics.mean(calls.seconds),
            "summaries": [r["summary"] for r in result.records]}


def driver_overhead(ray: Any, rounds: int) -> dict[str, float]:
    """A Ray round trip carrying a map call's request and result, and the store write per result."""

    @ray.remote(num_cpus=1)
    class Echo:
        def run(self, request: Any) -> dict[str, Any]:
            return {"role": "map", "prompt_tokens": 500, "generated_tokens": 64, "seconds": 1.0, "window": 8192,
                    "restored_tokens": 0, "summary": "x" * 400}

    actor = Echo.remote()
    request = ("y" * 2000,)  # a chunk of ~500 tokens
    ray.get(actor.run.remote(request))
    start = time.perf_counter()
    for _ in range(rounds):
        ray.get(actor.run.remote(request))
    trip = (time.perf_counter() - start) / rounds
    ray.kill(actor)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        info = ray.get(Echo.remote().run.remote(request))
        start = time.perf_counter()
        for i in range(rounds):
            store.put_call(f"{i:064x}", info)
        write = (time.perf_counter() - start) / rounds
    return {"round_trip_ms": trip * 1000, "store_write_ms": write * 1000}


def object_store(ray: Any) -> dict[str, float]:
    data = default_model_path().read_bytes()

    @ray.remote(num_cpus=1)
    def size(blob: bytes) -> int:
        return len(blob)

    start = time.perf_counter()
    ref = ray.put(data)
    put = time.perf_counter() - start
    ray.get(size.remote(b""))  # a worker started, so the next call measures the transfer only
    start = time.perf_counter()
    assert ray.get(size.remote(ref)) == len(data)
    get = time.perf_counter() - start
    return {"model_mb": len(data) / 2**20, "put_s": put, "get_in_worker_s": get}


def model(per_doc: float, overhead_s: float, startup_s: float, docs: int = 1000) -> list[dict[str, float]]:
    """Documents/hour on N one-thread workers, each on its own core: N documents at a time, each
    taking `per_doc` (its calls' own time), the driver serial at `overhead_s` per task."""
    rows = []
    for n in (1, 2, 4, 8, 16):
        compute = docs * per_doc / n
        driver = docs * overhead_s
        total = max(compute, driver) + startup_s
        rows.append({"workers": n, "docs_per_hour": docs / total * 3600, "hours_for_1000": total / 3600})
    return rows


class WithoutFixedHead:
    """The engine as before issue 16: a call's prompt reuses whatever prefix the last call left."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def complete(self, tokens: Any, **kwargs: Any) -> Any:
        kwargs.pop("head_end", None)
        return self.engine.complete(tokens, **kwargs)


def split_cost(paths: list[str], threads: int) -> dict[str, Any]:
    """What the fixed splits cost in one process: the same summarize batch, and the same passkey
    prompts in the grid's old order (each reusing the previous prompt's prefix), with and without."""
    from localctx.evaluate.passkey import ANSWER_TOKENS, build_passkey_prompt, passkey_key
    from localctx.runtime import open_engine

    out: dict[str, Any] = {}
    with open_engine(RunSpec(threads=threads)) as engine:
        times: dict[str, list[float]] = {"fixed": [], "reuse": []}
        for _ in range(1):
            for name, wrapped in (("fixed", engine), ("reuse", WithoutFixedHead(engine))):
                with tempfile.TemporaryDirectory() as home:
                    os.environ["LOCALCTX_HOME"] = home
                    engine.reset_cache()
                    start = time.perf_counter()
                    summarize_batch(paths, RunSpec(), OPTIONS, engine=wrapped)
                    times[name].append(time.perf_counter() - start)
        out["summarize_fixed_s"], out["summarize_reuse_s"] = min(times["fixed"]), min(times["reuse"])
        prefix = engine.tokenize("", add_bos=True)
        prompts = [build_passkey_prompt(lambda t: engine.tokenize(t, add_bos=False), prefix, n - ANSWER_TOKENS, d,
                                        passkey_key(0, 0))
                   for n in (512, 1024) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
        prompts.sort(key=lambda p: (len(p.tokens), p.tokens))
        answers: dict[str, list[str]] = {}
        for name in ("reuse", "fixed"):
            engine.reset_cache()
            start = time.perf_counter()
            answers[name] = [engine.complete(p.tokens, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                             **({"head_end": p.filler_start} if name == "fixed" else {})).text
                             for p in prompts]
            out[f"passkey_{name}_s"] = time.perf_counter() - start
        out["passkey_cells"] = len(prompts)
        out["passkey_answers_differ"] = sum(a != b for a, b in zip(answers["reuse"], answers["fixed"]))
    return out


def worker_batching(args: argparse.Namespace) -> None:
    """One worker with every core's threads, at --parallel 1 and then --parallel N, in one run."""
    cores = default_threads()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = documents(Path(tmp), args.docs, args.chars)
        for n in (1, args.parallel):
            one_worker = RayExecutor(Cluster(workers=1))
            runs[n] = batch(paths, RunSpec(threads=cores), one_worker, replace(OPTIONS, parallel=n))
            print(f"--workers 1 --parallel {n}: {runs[n]['seconds']:.1f} s ({runs[n]['after_start']:.1f} s after the "
                  f"runtime and the worker started), {runs[n]['calls']} calls", file=sys.stderr)
    one, many = runs[1], runs[args.parallel]
    report = {"cores": cores, "docs": args.docs, "chars": args.chars, "parallel": args.parallel,
              "one": {k: v for k, v in one.items() if k != "summaries"},
              "many": {k: v for k, v in many.items() if k != "summaries"},
              "ratio_total": one["seconds"] / many["seconds"],
              "ratio_after_start": one["after_start"] / many["after_start"],
              "identical": sum(a == b for a, b in zip(one["summaries"], many["summaries"]))}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--chars", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parallel", type=int, help="only: one worker at --parallel 1 against this")
    args = parser.parse_args()
    if args.parallel:
        return worker_batching(args)
    cores = default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        paths = documents(Path(tmp), args.docs, args.chars)
        cost = split_cost(paths, cores)
        print(f"fixed splits in one process: {cost}", file=sys.stderr)
        single = batch(paths, RunSpec(threads=cores), None)
        single1 = batch(paths, RunSpec(threads=1), None)
        print(f"one process, {cores} threads: {single['seconds']:.1f} s ({single['after_start']:.1f} s after loading), "
              f"{single['calls']} calls of {single['call_seconds']:.2f} s", file=sys.stderr)
        workers = batch(paths, RunSpec(), RayExecutor(Cluster(workers=cores)))
        print(f"{cores} workers, 1 thread each: {workers['seconds']:.1f} s ({workers['after_start']:.1f} s after "
              f"the runtime and the workers started), calls of {workers['call_seconds']:.2f} s", file=sys.stderr)
    import ray

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        overhead = driver_overhead(ray, args.rounds)
        transfer = object_store(ray)
    finally:
        ray.shutdown()
    per_task = (overhead["round_trip_ms"] + overhead["store_write_ms"]) / 1000
    per_doc_1thread = workers["call_seconds"] * workers["calls"] / args.docs
    startup = workers["seconds"] - workers["after_start"]
    report = {
        "cores": cores, "docs": args.docs, "chars": args.chars,
        "single": {k: v for k, v in single.items() if k != "summaries"},
        "workers": {k: v for k, v in workers.items() if k != "summaries"},
        "identical_to_one_thread_process": single1["summaries"] == workers["summaries"],
        "identical_to_all_threads_process": single["summaries"] == workers["summaries"],
        "single_1_thread": {k: v for k, v in single1.items() if k != "summaries"},
        "split_cost": cost,
        "ratio_total": single["seconds"] / workers["seconds"],
        "ratio_after_start": single["after_start"] / workers["after_start"],
        "driver": overhead, "per_task_overhead_fraction": per_task / workers["call_seconds"],
        "object_store": transfer,
        "model": model(per_doc_1thread, per_task, startup),
        "model_inputs": {"per_doc_s": per_doc_1thread, "per_task_s": per_task, "startup_s": startup},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
