"""Structured output through `localctx serve`, measured from the official `openai` client.

validity: 20 chat prompts, each asking for JSON under one of four schemas (`response_format:
          json_schema`); each answer is parsed and validated with `jsonschema`: N of 20 valid.
overhead: each prompt is also asked without `response_format` (free text), interleaved with its
          constrained twin so both see the same load; the generation rate of each (tokens/s, from
          the `localctx` timings of the response) and the ratio constrained / free, in one run.
          Greedy, `--parallel 1`, `--preset native`: one request at a time.
sampler:  in this process, the engine generating the same constrained answers: the median time
          spent in Sampler.sample per token with the grammar as applied (the chain's pick checked,
          all candidates masked only when refused), with every candidate masked first, and free
          (same prompts and budget), so the grammar's own cost is seen apart from the decode.

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_structured.py --json benchmarks/results/structured.json
    (--part server or --part sampler: one half; --prompts N: the first N prompts)
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import openai

import localctx

REPO = Path(__file__).resolve().parents[1]
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
               "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                              "city": {"type": "string", "maxLength": 40}}},
    "book": {"type": "object", "required": ["title", "author", "year", "genres"],
             "properties": {"title": {"type": "string", "maxLength": 60}, "author": {"type": "string", "maxLength": 40},
                            "year": {"type": "integer"},
                            "genres": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                       "minItems": 1, "maxItems": 3}}},
    "weather": {"type": "object", "required": ["city", "unit", "days"],
                "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
                               "days": {"type": "integer"}, "date": {"type": "string", "format": "date"}}},
    "review": {"type": "object", "required": ["product", "rating", "pros", "recommend"],
               "properties": {"product": {"type": "string", "maxLength": 40}, "rating": {"enum": [1, 2, 3, 4, 5]},
                              "pros": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
                              "recommend": {"type": "boolean"},
                              "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]}}},
}
PROMPTS = [
    ("person", "Invent a person who lives in Paris."), ("person", "Describe a retired sailor as a record."),
    ("person", "Give me a fictional teacher from Tokyo."), ("person", "Create a profile of a young painter."),
    ("person", "Who could be a baker in Rome? Make one up."),
    ("book", "Describe a classic novel."), ("book", "Recommend a science fiction book."),
    ("book", "Give me a children's book."), ("book", "Invent a mystery novel."), ("book", "Describe a cookbook."),
    ("weather", "Ask for a 3-day forecast for London."), ("weather", "Weather in New York for a week, in fahrenheit."),
    ("weather", "Tomorrow's weather in Berlin."), ("weather", "Forecast for Madrid, 5 days."),
    ("weather", "Weather for Sydney on 2025-03-01."),
    ("review", "Review a pair of running shoes."), ("review", "Review a coffee machine."),
    ("review", "Write a short review of a laptop."), ("review", "Review a cheap umbrella that broke."),
    ("review", "Review a library book you loved."),
]
MAX_TOKENS = 96  # constrained answers end with their JSON (about 20-40 tokens)
FREE_TOKENS = 48  # free answers run to their budget: a rate needs no more, and the CPU is shared


def start_server(home: Path, *args: str) -> tuple[subprocess.Popen, str]:
    log = home / "serve.log"
    env = {**os.environ, "LOCALCTX_HOME": str(home), "LOCALCTX_CACHE_DIR": str(home / "cache")}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "localctx", "serve", "--port", "0", *args],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=env)
    for _ in range(600):
        match = re.search(r" on (http://\S+?:\d+)", log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"serve exited:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("serve did not start")


def ask(client: openai.OpenAI, schema: str | None, prompt: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt + (" Answer in JSON." if schema else "")}]
    extra = ({"response_format": {"type": "json_schema", "json_schema": {"name": schema, "schema": SCHEMAS[schema],
                                                                          "strict": True}}} if schema else {})
    start = time.perf_counter()
    budget = MAX_TOKENS if schema else FREE_TOKENS
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=budget, temperature=0, **extra)
    wall = time.perf_counter() - start
    details = reply.model_extra["localctx"]
    out = {"schema": schema, "prompt": prompt, "text": reply.choices[0].message.content,
           "finish_reason": reply.choices[0].finish_reason, "tokens": details["generated_tokens"],
           "generation_seconds": details["generation_seconds"], "wall_seconds": round(wall, 3)}
    if schema:
        try:
            jsonschema.validate(json.loads(out["text"]), SCHEMAS[schema])
            out["valid"] = True
        except (ValueError, jsonschema.ValidationError) as exc:
            out["valid"], out["error"] = False, str(exc).splitlines()[0]
    return out


def sampler_cost(n_prompts: int) -> dict[str, float]:
    """Milliseconds per token inside Sampler.sample over the same prompts: free, with the grammar
    as the sampler applies it (the chain's pick checked, masking only when refused), and with
    every candidate masked first (the check forced to refuse)."""
    from localctx.engine import backend
    from localctx.engine.grammar import json_schema_grammar

    spent = {"t": 0.0, "n": 0}
    original, check = backend.Sampler.sample, backend.Sampler._allowed

    def timed(self: Any, ctx: Any, row: int) -> int:
        start = time.perf_counter()
        try:
            return original(self, ctx, row)
        finally:
            spent["t"] += time.perf_counter() - start
            spent["n"] += 1

    def masking(self: Any, token: int) -> bool:
        return False

    backend.Sampler.sample = timed  # type: ignore[method-assign]
    out: dict[str, list[float]] = {"grammar": [], "masked": [], "free": []}
    texts: dict[str, list[str]] = {"grammar": [], "masked": []}
    with localctx.open_model(preset="native", kv_cache=False) as engine:
        for schema, prompt in PROMPTS[:n_prompts]:
            tokens = engine.chat_tokens([{"role": "user", "content": prompt + " Answer in JSON."}])
            grammar = json_schema_grammar(SCHEMAS[schema])
            for label, g in (("grammar", grammar), ("masked", grammar), ("free", None)):
                backend.Sampler._allowed = masking if label == "masked" else check  # type: ignore[method-assign]
                spent.update(t=0.0, n=0)
                gen = engine.complete(tokens, max_tokens=MAX_TOKENS, temperature=0, grammar=g, stop=engine.chat_stop)
                out[label].append(spent["t"] / spent["n"] * 1000)
                texts.get(label, []).append(gen.text)
    backend.Sampler.sample, backend.Sampler._allowed = original, check  # type: ignore[method-assign]
    return {f"{label}_ms_per_token": round(statistics.median(v), 3) for label, v in out.items()} | {
        "same_greedy_answers": texts["grammar"] == texts["masked"]}


def rate(runs: list[dict[str, Any]]) -> float:
    return sum(r["tokens"] for r in runs) / sum(r["generation_seconds"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--part", choices=("all", "server", "sampler"), default="all")
    args = parser.parse_args()
    if args.part == "sampler":
        summary = {"sampler": sampler_cost(args.prompts), "load_average": os.getloadavg()}
        print(json.dumps(summary, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"summary": summary}, indent=1))
        return
    with tempfile.TemporaryDirectory() as home:
        proc, url = start_server(Path(home), "--parallel", "1", "--preset", "native")
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
            ask(client, None, "Hello.")  # warm-up
            constrained, free = [], []
            for schema, prompt in PROMPTS[: args.prompts]:
                constrained.append(ask(client, schema, prompt))
                free.append(ask(client, None, prompt))
                c, f = constrained[-1], free[-1]
                print(f"{schema:8} valid={c['valid']} {c['tokens']:3} tokens {rate([c]):5.1f} tok/s | "
                      f"free {f['tokens']:3} tokens {rate([f]):5.1f} tok/s  {c['text']!r}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    valid = sum(r["valid"] for r in constrained)
    summary = {"valid": valid, "of": len(constrained), "constrained_tps": round(rate(constrained), 2),
               "free_tps": round(rate(free), 2), "ratio": round(rate(constrained) / rate(free), 3),
               "per_prompt_ratio_median": round(statistics.median(
                   rate([c]) / rate([f]) for c, f in zip(constrained, free)), 3),
               "constrained_tokens": sum(r["tokens"] for r in constrained),
               "free_tokens": sum(r["tokens"] for r in free),
               "load_average": os.getloadavg()}
    if args.part == "all":
        summary["sampler"] = sampler_cost(args.prompts)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "constrained": constrained, "free": free}, indent=1))


if __name__ == "__main__":
    main()
