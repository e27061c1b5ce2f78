"""Overhead of localctx over raw llama-cpp-python: the same model, the same llama.cpp parameters,
the same prompts and greedy decoding, in one process, runs interleaved. Prints the throughput
ratio (localctx / raw); the target is >= 0.97.

    .venv/bin/python benchmarks/overhead.py [--reps 9] [--prompt-tokens 256] [--max-tokens 128] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
from common import CORPUS, raw_llama

import localctx

SAMPLING = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)


def time_localctx(engine, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    gen = localctx.generate_text(engine, prompt, max_tokens=max_tokens, temperature=0.0, stream=True)
    for _ in gen:
        pass
    return time.perf_counter() - start, gen.timings.generated_tokens


def time_raw(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, stream=True, seed=0, **SAMPLING):
        n += chunk["choices"][0]["finish_reason"] is None  # the last chunk only carries the finish reason
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="native")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    engine = localctx.open_model(preset=args.preset)
    llm = raw_llama(engine)
    tokens = engine.tokenize((CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8"), add_bos=False)
    # A different prompt per rep (the same for both sides) so neither reuses a cached prefix.
    prompts = [engine.detokenize(tokens[20000 + i * 3000 : 20000 + i * 3000 + args.prompt_tokens])
               for i in range(args.reps + 1)]
    time_localctx(engine, prompts[0], 8), time_raw(llm, prompts[0], 8)  # warm-up
    rows = {"localctx": [], "raw": []}
    for i, prompt in enumerate(prompts[1:]):
        order = [("localctx", time_localctx, engine), ("raw", time_raw, llm)]
        for name, fn, target in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            seconds, n = fn(target, prompt, args.max_tokens)
            rows[name].append({"seconds": seconds, "generated": n})
            print(f"rep {i} {name:<8} {seconds:6.2f} s  {n} tokens", file=sys.stderr)
    report = {"preset": args.preset, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "reps": args.reps, "params": engine.params.to_dict(), "llama_cpp_python": llama_cpp.__version__}
    for name, runs in rows.items():
        # Median end-to-end throughput: (prompt + generated tokens) per wall second of the whole call.
        report[name] = {"median_seconds": statistics.median(r["seconds"] for r in runs),
                        "generated": [r["generated"] for r in runs],
                        "tokens_per_second": statistics.median((args.prompt_tokens + r["generated"]) / r["seconds"] for r in runs)}
    report["ratio_of_medians"] = report["localctx"]["tokens_per_second"] / report["raw"]["tokens_per_second"]
    # Each rep runs both sides back to back on the same prompt: the ratio within a rep cancels the
    # machine's drift (other tenants, clock changes) that the medians of each side keep.
    report["paired_ratios"] = [r["seconds"] / l["seconds"] for l, r in zip(rows["localctx"], rows["raw"])]
    report["ratio"] = statistics.median(report["paired_ratios"])
    print(f"localctx {report['localctx']['tokens_per_second']:.1f} tok/s, raw llama-cpp-python "
          f"{report['raw']['tokens_per_second']:.1f} tok/s (medians); median paired throughput ratio "
          f"localctx/raw {report['ratio']:.3f} (target >= 0.97)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
