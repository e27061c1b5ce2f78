"""Length-adaptive scaling (`--preset auto`), measured on the default model (trained on 8,192 tokens).

switch:  a chat outgrows the trained window: the turn that moves the engine from s = 1 (8K) to
         YaRN s = 2 (16K), against the alternative without a ladder, loading the model again at
         yarn-16k and evaluating the same conversation. Reports the context switch itself, the
         re-evaluation, and memory (RSS and llama.cpp's KV cache) before and after.
planner: what `summarize --preset auto` chooses between for a document past the trained window:
         one pass at the scale the document needs (--strategy stuff) or map-reduce over unscaled
         chunks (--strategy map-reduce), on two cuts of Pride and Prejudice that need s = 2 and
         s = 4. Time, model calls and tokens of each.

Every case is written to --json as soon as it finishes, and a case already there is not run again:
an interrupted run resumes.

    .venv/bin/python benchmarks/bench_auto.py [switch] [planner] --json benchmarks/results/auto.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from common import CORPUS

import localctx
from localctx.memory import estimate

PLANNER_CUTS = {"s=2": 12_000, "s=4": 24_000}  # document tokens: past 8K (needs 16K), past 16K (needs 32K)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss() -> int:
    return psutil.Process().memory_info().rss


def excerpt(engine: localctx.Engine, tokens: int, start: int = 0) -> str:
    text = (CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = engine.tokenize(text, add_bos=False)
    return engine.detokenize(ids[start : start + tokens])


def bench_switch() -> dict[str, Any]:
    """Turn 1 fits 8K (about 7,000 tokens of document); turn 2 adds 1,500 more and needs 16K."""
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp) / "part1.txt", Path(tmp) / "part2.txt"
        with localctx.open_model(preset="auto") as engine:
            first.write_text(excerpt(engine, 7000), encoding="utf-8")
            second.write_text(excerpt(engine, 1500, start=7000), encoding="utf-8")
            chat = localctx.start_chat(engine, max_tokens=64, temperature=0.0)
            chat.attach(first)
            log("switch: turn 1, unscaled ...")
            chat.ask("Who are the Bennets?")
            before = {"rss": rss(), "n_ctx": engine.n_ctx, "kv": estimate(engine.facts, engine.params).kv_bytes,
                      "turn_prompt_s": chat.stats.last.prompt_seconds}
            chat.attach(second)
            log("switch: turn 2, past 8K: the ladder moves to s = 2 ...")
            chat.ask("And who is Mr. Darcy?")
            switch = engine.switches[-1]
            conversation = chat.stats.last.prompt_tokens
            after = {"rss": rss(), "n_ctx": engine.n_ctx, "kv": estimate(engine.facts, engine.params).kv_bytes,
                     "turn_prompt_s": chat.stats.last.prompt_seconds}
            messages = [m.as_dict() for m in chat.messages[:-1]]  # the conversation as turn 2 saw it
        log("switch: baseline, loading the model again at yarn-16k and evaluating the same conversation ...")
        start = time.perf_counter()
        with localctx.open_model(preset="yarn-16k") as fixed:
            loaded = time.perf_counter() - start
            tokens = fixed.chat_tokens(messages)
            fixed.complete(tokens, max_tokens=1)
            reload_total = time.perf_counter() - start
    switch_total = switch.seconds + after["turn_prompt_s"]
    return {
        "from": before["n_ctx"], "to": after["n_ctx"], "conversation_tokens": conversation,
        "context_switch_s": round(switch.seconds, 3), "reevaluation_s": round(after["turn_prompt_s"], 1),
        "switch_total_s": round(switch_total, 1),
        "baseline_reload_s": round(loaded, 2), "baseline_total_s": round(reload_total, 1),
        "ratio_switch_to_reload": round(switch_total / reload_total, 3),
        "rss_before_mib": round(before["rss"] / 2**20), "rss_after_mib": round(after["rss"] / 2**20),
        "kv_before_mib": round(before["kv"] / 2**20), "kv_after_mib": round(after["kv"] / 2**20),
    }


def bench_planner(cut: str, tokens: int) -> dict[str, Any]:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / f"pride_{tokens}.txt"
        with localctx.open_model(preset="auto") as engine:
            doc.write_text(excerpt(engine, tokens), encoding="utf-8")
            for strategy in ("stuff", "map-reduce"):
                os.environ["LOCALCTX_CACHE_DIR"] = str(Path(tmp) / strategy)  # an empty store: every call made
                log(f"planner {cut}: {strategy} over {tokens:,} tokens ...")
                start = time.perf_counter()
                result = localctx.summarize_files([doc], engine=engine,
                                                  options=localctx.SummarizeOptions(strategy=strategy))
                record = result.records[0]
                if record["status"] != "ok":
                    raise SystemExit(f"{strategy}: {record['error']}")
                rows[strategy] = {"seconds": round(time.perf_counter() - start, 1),
                                  "model_calls": record["model_calls"], "windows": record["windows"],
                                  "prompt_tokens": result.stats.prompt_tokens,
                                  "generated_tokens": result.stats.generated_tokens,
                                  "summary": record["summary"]}
                log(json.dumps({k: v for k, v in rows[strategy].items() if k != "summary"}))
    return {"document_tokens": tokens, **rows,
            "ratio_one_pass_to_map_reduce": round(rows["stuff"]["seconds"] / rows["map-reduce"]["seconds"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", default=["switch", "planner"], choices=["switch", "planner"])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/auto.json"))
    args = ap.parse_args()
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}

    def save() -> None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    if "switch" in args.parts and "switch" not in report:
        report["switch"] = bench_switch()
        save()
    if "planner" in args.parts:
        planner = report.setdefault("planner", {})
        for cut, tokens in PLANNER_CUTS.items():
            if cut not in planner:
                planner[cut] = bench_planner(cut, tokens)
                save()
    print(json.dumps({k: v for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
