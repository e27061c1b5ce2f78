"""Prompt and generation throughput at several context depths, per attention/KV-cache config.

One pass per config fills the context step by step: the prompt at each depth extends the previous
one, llama-cpp-python reuses the cached prefix, and the prompt time is summed over the steps, so
"prompt tok/s at 16K" is the time to process the first 16K tokens, as a 16K prompt would take.
Each config runs in its own process (clean peak-RSS reading).

    .venv/bin/python benchmarks/throughput.py --depths 2k,8k,16k,32k --configs fa-f16,nofa-f16,fa-q8_0 --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import proc_status

CONFIGS = {"fa-f16": (True, "f16"), "nofa-f16": (False, "f16"), "fa-q8_0": (True, "q8_0")}
GEN_TOKENS = 32


def peak_rss() -> int:
    return proc_status()["VmHWM"]


def gpu_memory_used() -> int | None:
    """Memory in use on the (sole) GPU per nvidia-smi; None without one. The device machines run one
    process at a time, so this is this process's weights, KV cache and compute buffers."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 and out.stdout.strip() else None


def child(config: str, depths: list[int], preset: str, model: str | None) -> None:
    import localctx
    from common import CORPUS

    fa, cache = CONFIGS[config]
    window = max(localctx.resolve_preset(preset, model).n_ctx, max(depths))
    run = dict(ctx=window, flash_attn=fa, cache_type=cache)
    engine = localctx.open_model(model, preset, **run)
    params = engine.params
    rss_loaded = peak_rss()
    tokens = engine.tokenize((CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8"), add_bos=False)
    engine.complete(tokens[-64:], max_tokens=4)  # warm-up, on tokens no measured prompt starts with
    prompt_seconds, rows = 0.0, []
    for depth in depths:
        gen = engine.complete(tokens[: depth - GEN_TOKENS], max_tokens=GEN_TOKENS, temperature=0.0)
        prompt_seconds += gen.timings.prompt_seconds  # only the tokens not already cached were processed
        est = localctx.estimate_memory(preset, model, **{**run, "ctx": depth})
        rows.append({"config": config, "depth": depth, "prompt_tokens": depth - GEN_TOKENS,
                     "prompt_tps": round((depth - GEN_TOKENS) / prompt_seconds, 1),
                     "generation_tps": round(gen.timings.generation_tps, 1), "generated": gen.timings.generated_tokens,
                     "estimate_bytes": est.total, "kv_bytes": est.kv_bytes, "peak_rss_bytes": peak_rss(),
                     "rss_after_load_bytes": rss_loaded, "window": params.n_ctx,
                     "device": "cuda" if engine.gpu_layers else "cpu", "gpu_layers": engine.gpu_layers,
                     "gpu_mem_used_bytes": gpu_memory_used()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


def parse_depths(text: str) -> list[int]:
    return [int(t[:-1]) * 1024 if t.lower().endswith("k") else int(t) for t in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2k,8k,16k,32k")
    ap.add_argument("--configs", default="fa-f16,nofa-f16,fa-q8_0")
    ap.add_argument("--preset", default="yarn-32k")
    ap.add_argument("--model", help="GGUF file [default: the default model]")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    depths = sorted(parse_depths(args.depths))
    if args.child:
        return child(args.child, depths, args.preset, args.model)
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for config in args.configs.split(","):
        model = ["--model", args.model] if args.model else []
        proc = subprocess.run([sys.executable, __file__, "--child", config, "--depths", args.depths,
                               "--preset", args.preset, *model], stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            print(f"{config}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        # Newer measurements of the same (config, depth) replace older ones.
        results = [r for r in results if (r["config"], r["depth"]) not in {(x["config"], x["depth"]) for x in rows}]
        results += rows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(sorted(results, key=lambda r: (r["config"], r["depth"])), indent=2))
    for r in sorted(results, key=lambda r: (r["depth"], r["config"])):
        print(f"{r['depth']:>6} {r['config']:<9} prompt {r['prompt_tps']:>7.1f} tok/s  gen {r['generation_tps']:>6.1f} tok/s  "
              f"est {r['estimate_bytes'] / 2**20:7.0f} MiB  peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB"
              + (f"  GPU mem {r['gpu_mem_used_bytes'] / 2**20:7.0f} MiB" if r.get("gpu_mem_used_bytes") else ""))


if __name__ == "__main__":
    main()
