"""A real agent loop against `localctx serve` (issue 24): the official `openai` client, two tools
run here in Python, the default model, greedy. The conversation is call → tool result → ... →
final answer, run twice: first with `tool_choice: "required"` for the first turn (a grammar forces
the call), then `auto`, then `none` (the answer, with the results in hand, as agents do when a
loop must end); then with `"auto"` for the first two turns and `none` last.
Printed and saved: every turn's finish reason, calls (name, arguments, whether they validate
against the tool's schema) and text, and the time each turn took.

    flock -x /tmp/localctx-cpu.lock .venv/bin/python benchmarks/bench_agent.py --json benchmarks/results/agent.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import openai
from bench_parallel import Server  # a server process on a free port, ready when /health answers

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city.",
                                      "parameters": CITY}},
]
RESULTS = {"get_weather": lambda a: f"Sunny, 24 degrees Celsius in {a.get('city')}.",
           "get_time": lambda a: f"It is 14:05 in {a.get('city')}."}
QUESTION = "What is the weather in Paris, and what time is it in Rome? Use the tools."


def conversation(client: openai.OpenAI, choices: list[str]) -> list[dict]:
    """One agent loop: a turn per entry of `choices` (its tool_choice), stopping at a text answer."""
    messages: list[dict] = [{"role": "user", "content": QUESTION}]
    turns = []
    for choice in choices:
        start = time.perf_counter()
        reply = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice=choice,
                                               max_tokens=96, temperature=0)
        c = reply.choices[0]
        calls = []
        for call in c.message.tool_calls or []:
            args = json.loads(call.function.arguments)
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            valid = not list(jsonschema.Draft202012Validator(schema).iter_errors(args))
            calls.append({"id": call.id, "name": call.function.name, "arguments": args, "valid": valid})
        turns.append({"tool_choice": choice, "finish_reason": c.finish_reason, "calls": calls,
                      "text": c.message.content, "seconds": round(time.perf_counter() - start, 2),
                      "prompt_tokens": reply.usage.prompt_tokens,
                      "cached_tokens": reply.usage.prompt_tokens_details.cached_tokens})
        if not calls:
            break
        messages.append({"role": "assistant", "content": c.message.content, "tool_calls": [
            {"id": k["id"], "type": "function", "function": {"name": k["name"], "arguments": json.dumps(k["arguments"])}}
            for k in calls]})
        messages += [{"role": "tool", "tool_call_id": k["id"], "content": RESULTS[k["name"]](k["arguments"])}
                     for k in calls]
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("localctx", [sys.executable, "-m", "localctx", "serve", "--port", "0", "--parallel", "1"],
                        Path(tmp))
        try:
            client = server.client
            out = {"required": conversation(client, ["required", "auto", "none"]),
                   "auto": conversation(client, ["auto", "auto", "none"])}
        finally:
            server.stop()
    for name, turns in out.items():
        print(f"tool_choice {name}:")
        for t in turns:
            calls = ", ".join(f"{k['name']}({json.dumps(k['arguments'])}){'' if k['valid'] else ' INVALID'}"
                              for k in t["calls"])
            print(f"  [{t['tool_choice']}] {t['finish_reason']}: {calls or repr(t['text'])} "
                  f"({t['seconds']} s, prompt {t['prompt_tokens']}, cached {t['cached_tokens']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
