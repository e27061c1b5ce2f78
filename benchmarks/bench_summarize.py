"""Summarizer overhead: `localctx summarize` wall time against the model's own cost for the same
work, measured in the same process: every model call the summarizer made (the same prompt tokens,
the same number of generated tokens, the same order, so the same KV prefix reuse) is replayed
through a raw llama_cpp.Llama built with identical parameters. Target: summarizer / raw <= 1.15.

Also counts the model calls map-reduce needs for alice.txt at the extended window (yarn-32k)
against the native 8K window (the native run is a real run, not an estimate).

    .venv/bin/python benchmarks/bench_summarize.py [--preset yarn-32k] [--skip-native] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import CORPUS, raw_llama

import localctx

OPTIONS = localctx.SummarizeOptions()
ONE_PASS_CHARS = 42_000  # ~9.5K tokens of Pride and Prejudice: past the native 8K, inside yarn-32k


@dataclass
class Recorder:
    """Wraps the engine and records every model call (tokens, answer length, why it ended)."""

    engine: Any
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def complete(self, tokens: Any, **kwargs: Any) -> Any:
        gen = self.engine.complete(tokens, **kwargs)
        self.calls.append({"tokens": list(tokens), "generated": gen.timings.generated_tokens,
                           "stopped": gen.finish_reason == "stop"})
        return gen


def run_summarizer(engine: Any, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    recorder = Recorder(engine)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOCALCTX_CACHE_DIR"] = tmp  # an empty store: every call is made, none reused
        start = time.perf_counter()
        result = localctx.summarize_files([path], options=OPTIONS, engine=recorder)
        seconds = time.perf_counter() - start
    record = result.records[0]
    if record["status"] != "ok":
        raise SystemExit(f"{path}: {record['error']}")
    return record, recorder.calls, seconds


def replay_raw(llm: Any, calls: list[dict[str, Any]]) -> float:
    """The same calls through raw llama-cpp-python: the same tokens evaluated (prefix reuse
    included), the same number of tokens sampled with the same sampler settings."""
    start = time.perf_counter()
    for call in calls:
        wanted = call["generated"] + (1 if call["stopped"] else 0)  # the end-of-generation token is sampled too
        n = 0
        for _ in llm.generate(call["tokens"], temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                              repeat_penalty=OPTIONS.repeat_penalty):
            n += 1
            if n >= wanted:
                break
    return time.perf_counter() - start


def bench_document(engine: Any, llm: Any, label: str, path: Path) -> dict[str, Any]:
    print(f"{label}: summarizing {path.name} ...", file=sys.stderr, flush=True)
    record, calls, seconds = run_summarizer(engine, path)
    print(f"{label}: replaying {len(calls)} model calls through raw llama-cpp-python ...", file=sys.stderr, flush=True)
    raw = replay_raw(llm, calls)
    row = {"document": label, "file": path.name, "tokens": record["tokens"], "strategy": record["strategy"],
           "chunks": record["chunks"], "model_calls": len(calls),
           "prompt_tokens": sum(len(c["tokens"]) for c in calls), "generated_tokens": sum(c["generated"] for c in calls),
           "summarizer_seconds": round(seconds, 2), "raw_seconds": round(raw, 2), "ratio": round(seconds / raw, 3),
           "summary": record["summary"]}
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}), file=sys.stderr, flush=True)
    return row


def native_calls(path: Path) -> dict[str, Any]:
    print(f"native: summarizing {path.name} at the trained 8K window ...", file=sys.stderr, flush=True)
    with localctx.open_model(preset="native") as engine:
        record, calls, seconds = run_summarizer(engine, path)
    return {"preset": "native", "window": engine.n_ctx, "chunks": record["chunks"], "model_calls": len(calls),
            "prompt_tokens": sum(len(c["tokens"]) for c in calls), "seconds": round(seconds, 1),
            "summary": record["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="yarn-32k")
    ap.add_argument("--skip-native", action="store_true", help="do not run the native-8K call count")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one_pass = Path(tmp) / "pride_excerpt.txt"
        one_pass.write_text((CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")[:ONE_PASS_CHARS],
                            encoding="utf-8")
        engine = localctx.open_model(preset=args.preset)
        llm = raw_llama(engine)
        rows = [bench_document(engine, llm, "one pass", one_pass),
                bench_document(engine, llm, "map-reduce", CORPUS / "alice.txt")]
        window = engine.n_ctx
        engine.close()
        llm.close()
    report: dict[str, Any] = {"preset": args.preset, "window": window, "documents": rows}
    if not args.skip_native:
        report["native"] = native_calls(CORPUS / "alice.txt")
    print("| document | tokens | strategy | chunks | model calls | prompt + generated tokens | summarizer s | raw s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['tokens']:,} | {r['strategy']} | {r['chunks']} | {r['model_calls']} | "
              f"{r['prompt_tokens']:,} + {r['generated_tokens']:,} | {r['summarizer_seconds']:.1f} | "
              f"{r['raw_seconds']:.1f} | {r['ratio']:.3f} |")
    if "native" in report:
        n, ext = report["native"], rows[1]
        print(f"\nalice.txt map-reduce: {ext['model_calls']} model calls ({ext['chunks']} chunks) at {args.preset} "
              f"({window:,} tokens) against {n['model_calls']} ({n['chunks']} chunks) at the native "
              f"{n['window']:,}-token window.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
