"""Self-Extend's mechanism, measured on the default model.

edits:   one token cached at position 100, moved to 50 with llama_memory_seq_add and with
         llama_memory_seq_div, then the next token's logits against evaluating it at 50 directly
         (and, for scale, the difference evaluating at other absolute positions makes).
grouped: perplexity of tokens 2,000-2,400 of Alice after 2,000 tokens, on the default weights under
         a header claiming 1,024 trained tokens (so Self-Extend must group), for the unedited model
         (whose weights were really trained on 8K: the reference) and Self-Extend G=4, W=512 with
         the engine's grouping (llama_memory_seq_add).
speed:   a 16K-token prompt of Pride and Prejudice, then 64 generated tokens, under yarn-32k and
         self-extend-32k in the same process (same window, same build): prompt and generation
         tokens/s, their ratios, and the time the engine spent issuing position edits. (The keys'
         re-rotation that the edits cause happens inside llama.cpp's next decode: it is part of
         the ratio, not of the edit time.)

    .venv/bin/python benchmarks/bench_self_extend.py --json benchmarks/results/self_extend.json
    .venv/bin/python benchmarks/bench_self_extend.py speed   # only the speed part (merged into the JSON)
"""
from __future__ import annotations

from localctx.engine.positions import Positions  # llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from gguf import Keys

from common import CORPUS

from localctx.convert import override_metadata, plan_conversion, write_converted
from localctx.gguf_meta import arch_key
from localctx.paths import default_model_path
from localctx.runtime import RunSpec, open_engine


def bench_edits() -> dict[str, Any]:
    with open_engine(RunSpec(preset="native", kv_cache=False)) as e:
        ctx = e.lane.ctx
        mem = ctx.mem
        toks = e.tokenize("The quick brown fox")

        def run(first: int, edit: Any = None, at: int = 51) -> np.ndarray:
            e.reset_cache()
            for tok, pos, want in ((toks[0], first, False), (toks[1], None, True)):
                if pos is None:
                    if edit:
                        edit()
                    pos = at
                ctx.batch.clear()
                ctx.batch.add(tok, pos, 0, want)
                ctx.decode(ctx.batch)
            return e.last_logits()

        ref = run(50)
        diff = lambda x: float(np.abs(ref - x).max())  # noqa: E731
        return {"seq_add_100_to_50": diff(run(100, lambda: llama_cpp.llama_memory_seq_add(mem, 0, -1, -1, -50))),
                "seq_div_100_to_50": diff(run(100, lambda: llama_cpp.llama_memory_seq_div(mem, 0, -1, -1, 2))),
                "no_edit_at_0_instead_of_50": diff(run(0, at=1)),
                "no_edit_at_3000_instead_of_50": diff(run(3000, at=3001))}


def bench_grouped() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "trained-1k.gguf"
        plan = plan_conversion(default_model_path(), "native")
        write_converted(override_metadata(plan, {arch_key(Keys.LLM.CONTEXT_LENGTH, "llama"): 1024}), model)
        preset = Path(tmp) / "se.toml"
        preset.write_text('method = "self-extend"\ntarget_ctx = 2500\n[self_extend]\ngroup = 4\nwindow = 512\n')
        rows = {}
        for name, spec in (("unedited (extrapolated past the header)", RunSpec(model=str(model), preset="native", ctx=2400)),
                           ("self-extend G=4 W=512", RunSpec(model=str(model), preset=str(preset)))):
            with open_engine(replace(spec, kv_cache=False)) as e:
                toks = e.tokenize((CORPUS / "alice.txt").read_text())[:2400]
                logits = e.logits_at(toks, list(range(1999, 2399)))
                lp = logits - logits.max(1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(1, keepdims=True))
                rows[name] = {"ppl": round(float(np.exp(-lp[np.arange(400), toks[2000:2400]].mean())), 3),
                              "max_position": e.max_position()}
        return rows


def bench_speed(length: int = 16384, gen: int = 64, order: tuple[str, ...] = ("yarn-32k", "self-extend-32k"),
                ) -> dict[str, Any]:
    rows: dict[str, Any] = {"order": list(order)}
    for preset in order:
        with open_engine(RunSpec(preset=preset, ctx=length + 2 * gen, kv_cache=False)) as e:
            toks = e.tokenize((CORPUS / "pride_and_prejudice.txt").read_text())[:length]
            edits = {"calls": 0, "seconds": 0.0}
            group = Positions.before  # every sequence's position edits go through it (a class attribute)

            def timed(self: Positions, ctx: Any, seq: int, n: int, b: int) -> None:
                t = time.perf_counter()
                group(self, ctx, seq, n, b)
                edits["calls"] += 1
                edits["seconds"] += time.perf_counter() - t

            Positions.before = timed  # type: ignore[method-assign]
            try:
                out = e.complete(toks, max_tokens=gen)
            finally:
                Positions.before = group  # type: ignore[method-assign]
            t = out.timings
            rows[preset] = {"prompt_tokens": t.prompt_tokens, "prompt_seconds": round(t.prompt_seconds, 2),
                            "prompt_tps": round(t.prompt_tps, 2), "generated_tokens": t.generated_tokens,
                            "generation_tps": round(t.generation_tps, 2),
                            "edit_seconds": round(edits["seconds"], 3), "grouped_tokens": e.slot(0).positions.grouped,
                            "max_position": e.max_position()}
    y, s = rows["yarn-32k"], rows["self-extend-32k"]
    rows["ratio_self_extend_over_yarn"] = {"prompt_tps": round(s["prompt_tps"] / y["prompt_tps"], 3),
                                           "generation_tps": round(s["generation_tps"] / y["generation_tps"], 3)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", default=["edits", "grouped", "speed"], choices=["edits", "grouped", "speed"])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/self_extend.json"))
    ap.add_argument("--speed-order", default="yarn-32k,self-extend-32k",
                    help="which preset the speed part runs first (the first load pays the cold start)")
    args = ap.parse_args()
    order = tuple(args.speed_order.split(","))
    run = {"edits": bench_edits, "grouped": bench_grouped, "speed": lambda: bench_speed(order=order)}
    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    report.update({part: run[part]() for part in args.parts})
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
