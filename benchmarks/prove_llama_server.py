"""Proof that a baked GGUF carries its preset in llama.cpp's own llama-server, with no flags
(issue 26). llama-server, built from the llama.cpp vendored in llama-cpp-python
(scripts/build_llama_server.sh), runs the converted file with no RoPE flags and continues a prompt
greedily, returning each step's top log-probabilities; localctx does the same, decoding as the
server does (the prompt in batches, then each token alone):

  preset:  localctx, the original model with the preset at run time (what the user tuned);
  baked:   localctx, the converted file with no RoPE settings (the same llama.cpp, in-process);
  control: llama-server on the *original* file with the default YaRN's flags (--control), against
           the tuned preset: it must differ, or the comparison proves nothing. (With no flags at
           all, llama-server refuses the prompt: it caps a slot at the file's context_length.)

The prompt is TOKENS tokens of a corpus text (past the trained window by default, where the
extension acts); llama-server gets token ids, so both sides see the same tokens.

    server=$(scripts/build_llama_server.sh)
    .venv/bin/python benchmarks/prove_llama_server.py --server "$server" --preset tuned-NAME \\
        [--tokens 9216] [--generate 16] [--json FILE]
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from common import CORPUS

from localctx.convert import convert, plan_conversion, prompt_tokens
from localctx.gguf_meta import facts_from_header, read_header
from localctx.params import default_threads
from localctx.presets import Ladder, file_params
from localctx.runtime import Resolved, RunSpec, open_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(server: str, model: Path, ctx: int, tokens: list[int], generate: int, top: int,
           flags: Sequence[str] = ()) -> dict:
    """Greedy tokens and their top log-probabilities from llama-server (no RoPE flags unless given),
    or the error it answered with."""
    port = free_port()
    cmd = [server, "-m", str(model), "-c", str(ctx), "-np", "1", "-fa", "on", "-t", str(default_threads()),
           *flags, "--port", str(port), "--host", "127.0.0.1", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, proc)
        body = {"prompt": tokens, "n_predict": generate, "temperature": 0, "n_probs": top, "cache_prompt": False,
                "ignore_eos": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                out = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return {"error": json.loads(exc.read())["error"]["message"], "status": exc.code}
        steps = out["completion_probabilities"]
        return {"tokens": [s["id"] for s in steps], "seconds": round(time.perf_counter() - start, 1),
                "top": [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"llama-server exited: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit("llama-server did not become ready")


def generated(engine: object, prompt: list[int], n: int, top: int) -> dict:
    """Greedy tokens and their top log-probabilities from localctx's engine, decoded as llama-server
    decodes them: the prompt in batches, then each generated token alone (llama.cpp's CPU flash
    attention gives slightly different logits for different batch splits)."""
    start = time.perf_counter()
    run = engine.start(prompt, max_tokens=n, temperature=0.0, logprobs=top)  # type: ignore[attr-defined]
    while not run.done:
        engine.step()  # type: ignore[attr-defined]
    picks = run.drain_logprobs()
    return {"tokens": [p.token for p in picks], "top": [dict(p.top) for p in picks],
            "seconds": round(time.perf_counter() - start, 1)}


def compare(a: dict, b: dict) -> dict:
    """Greedy tokens, and the largest |Δ log-probability| over a's top tokens that b also lists, at
    every step up to the first different token (after it, the two continue different texts)."""
    same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
    steps = range(min(same + 1, len(a["top"]), len(b["top"])))
    deltas = [abs(lp - b["top"][i][tok]) for i in steps for tok, lp in a["top"][i].items() if tok in b["top"][i]]
    return {"same_tokens": f"{same}/{len(a['tokens'])}", "max_abs_dlogprob": round(max(deltas, default=0.0), 6),
            "same_top_sets": sum(set(a["top"][i]) == set(b["top"][i]) for i in steps), "steps_compared": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the llama-server binary")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--text", default="alice.txt", help="a corpus file")
    parser.add_argument("--tokens", type=int, default=9216)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--control", default="yarn-16k", help="the preset whose llama-server flags are the control")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    plan = plan_conversion(args.model or _default_model(), args.preset)
    ctx = max(plan.params.n_ctx, math.ceil((args.tokens + args.generate) / 256) * 256)
    params = replace(plan.params, n_ctx=ctx)
    text = (CORPUS / args.text).read_text()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        baked = Path(tmp) / "baked.gguf"
        done = convert(plan.source, baked, args.preset)
        print(f"baked {args.preset}: {[(c.key, c.new) for c in done.plan.changes]}, tensor "
              f"{done.plan.tensor.to_dict() if done.plan.tensor else None}", file=sys.stderr, flush=True)
        original = facts_from_header(read_header(plan.source))
        with open_engine(Resolved(RunSpec(model=plan.source), original, Ladder((params,)))) as engine:
            prompt = prompt_tokens(engine, text, args.tokens)
            preset = generated(engine, prompt, args.generate, args.top)
        facts = facts_from_header(read_header(baked))
        from_file = replace(file_params(facts, ctx), flash_attn=params.flash_attn, n_batch=params.n_batch,
                            n_ubatch=params.n_ubatch)
        with open_engine(Resolved(RunSpec(model=baked), facts, Ladder((from_file,)))) as engine:
            file = generated(engine, prompt, args.generate, args.top)
        server = served(args.server, baked, ctx, prompt, args.generate, args.top)
        refused = served(args.server, plan.source, ctx, prompt, 1, 1)  # no flags: the slot is capped at 8K
        flags = plan_conversion(plan.source, args.control).params.llama_flags()
        flags = [f for i, f in enumerate(flags) if f != "-c" and (i == 0 or flags[i - 1] != "-c")]
        control = served(args.server, plan.source, ctx, prompt, args.generate, args.top, flags)
    out = {"preset": args.preset, "model": plan.source.name, "text": args.text, "prompt_tokens": len(prompt),
           "ctx": ctx, "generated": args.generate, "top": args.top,
           "llama_server_baked_vs_localctx_preset": compare(server, preset),
           "llama_server_baked_vs_localctx_baked": compare(server, file),
           f"control_llama_server_original_with_{args.control}_flags_vs_localctx_preset": compare(control, preset),
           "control_flags": flags,
           "llama_server_original_no_flags": refused.get("error", "accepted"),
           "seconds": {"localctx_preset": preset["seconds"], "localctx_baked": file["seconds"],
                       "llama_server_baked": server["seconds"], "llama_server_control": control["seconds"],
                       "all": round(time.perf_counter() - start, 1)}}
    print(json.dumps(out, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def _default_model() -> Path:
    from localctx.paths import default_model_path

    return default_model_path()


if __name__ == "__main__":
    main()
