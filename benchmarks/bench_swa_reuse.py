"""What the window-sized sliding-window cache (swa_full off, localctx's default) costs when a KV
cache is reused, against the full-size one (swa_full on, llama-cpp-python's default).

A synthetic model with Gemma 3 270M's layout (tests/gguf_runnable.py: 18 layers, 15 sliding over
512 tokens, random weights: the timings are real, the text is noise), at a 16K window, a
6,000-token document (Pride and Prejudice):

  chat:      turn 1 = document + question; turn 2 = turn 1 + answer + another question (what a chat
             does: the conversation only grows).
  new question: the document + question 1 with a long answer (800 tokens), then the document +
             question 2 (what `generate --file DOC` twice in one engine, or a server, does: the
             cache goes back to the end of the document, further than the sliding window holds).
             Without KV snapshots, and with them (the document restored from its snapshot).

For each: the tokens the second request evaluated, its prompt time, and the KV cache size.

    .venv/bin/python benchmarks/bench_swa_reuse.py --json benchmarks/results/swa_reuse.json
"""
from __future__ import annotations

from localctx.engine.backend import Batch, Context  # llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import CORPUS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gguf_runnable import write_runnable_model  # noqa: E402

from localctx.memory import estimate  # noqa: E402
from localctx.runtime import RunSpec, open_engine  # noqa: E402

DOC, ANSWER, CTX = 6000, 800, 16384


def counted() -> tuple[dict[str, int], Callable[[], None]]:
    """Count the tokens every llama_decode evaluates, whichever path sends them (a document's
    `Slot.decode`, the scheduler's prefill chunks); returns the counter and what undoes the wrap."""
    seen = {"tokens": 0}
    decode = Context.decode

    def wrapper(self: Context, batch: Batch) -> None:
        seen["tokens"] += batch.n
        decode(self, batch)

    Context.decode = wrapper  # type: ignore[method-assign]
    return seen, lambda: setattr(Context, "decode", decode)


def scenario(model: Path, swa_full: bool, kind: str, cache_dir: Path) -> dict[str, Any]:
    os.environ["LOCALCTX_CACHE_DIR"] = str(cache_dir)
    snapshots = kind == "new question, snapshots"
    with open_engine(RunSpec(model=str(model), preset="extrapolate-16k", ctx=CTX, swa_full=swa_full,
                             kv_cache=snapshots)) as e:
        doc = e.tokenize((CORPUS / "pride_and_prejudice.txt").read_text())[:DOC]
        q1, q2 = (e.tokenize(f" Question {i}: who is Mr Darcy?", add_bos=False) for i in (1, 2))
        filler = (e.tokenize(" and so on", add_bos=False) * ANSWER)[:ANSWER]
        seen, undo = counted()
        try:
            if kind == "chat":
                first = doc + q1
                e.complete(first, max_tokens=1)
                second = first + filler[:40] + q2  # a short answer, then the next question
            else:
                e.complete(doc + q1 + filler, max_tokens=1, document_end=DOC)
                second = doc + q2
            seen["tokens"] = 0
            out = e.complete(second, max_tokens=1, document_end=DOC if kind != "chat" else None)
        finally:
            undo()
        return {"swa_full": swa_full, "scenario": kind, "second_request_tokens": len(second),
                "evaluated": seen["tokens"], "restored": out.timings.restored_tokens,
                "prompt_seconds": round(out.timings.prompt_seconds, 3),
                "kv_bytes": estimate(e.facts, e.params).kv_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/swa_reuse.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_runnable_model(Path(tmp) / "gemma3-270m-shape.gguf", "gemma3", n_layer=18, n_embd=640,
                                     n_head=4, n_head_kv=1, n_ff=2048, context=32768, sliding_window=512)
        for kind in ("chat", "new question", "new question, snapshots"):
            for swa_full in (False, True):
                row = scenario(model, swa_full, kind, Path(tmp) / f"cache-{swa_full}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
