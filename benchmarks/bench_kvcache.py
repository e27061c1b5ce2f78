"""KV snapshots, measured on the default model with `--preset auto` (a ~12K-token document needs
YaRN s = 2, a 16,384-token window).

generate: `localctx generate --file DOC Q1` (evaluates the document, saves its snapshot), then
          `... Q2` in a new process (restores it): the second's prompt time against the first's;
          then `... Q2 --no-kv-cache` (a fresh evaluation): the answers must be equal.
logits:   the first answer token's logits after a restore against a fresh evaluation, in one process.
load:     the snapshot's size, the time a restore takes, and the disk's read speed of the same file
          (cold: its pages dropped from the page cache with posix_fadvise; warm: cached).
chat:     `localctx chat --file DOC` piped Q1, then a new chat session Q2 (restores), then Q2 with
          --no-kv-cache: prompt times and answers.
sizes:    snapshot bytes per 1K tokens for f16 and q8_0 KV (a 2,048-token document, native).
split:    why the document is always evaluated apart from the question: the largest logit
          difference between evaluating a prompt in one pass and as document-then-question.

Snapshots go to --kv-dir (default a temp directory, not the repository: they are hundreds of MB).
Every case is written to --json when it finishes; a case already there is not run again.

    .venv/bin/python benchmarks/bench_kvcache.py --json benchmarks/results/kvcache.json
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import CORPUS

import localctx
from localctx.generate import GenerateRequest, build_prompt
from localctx.kvcache import KVStore, SnapshotKey, read_header

REPO = Path(__file__).resolve().parents[1]
DOC_TOKENS = 12_000
Q1 = "Who are the Bennet daughters? Name them."
Q2 = "Who is Mr. Darcy, and what does Elizabeth think of him?"
ANSWER = 48
PRESET = "auto"
SPLIT_DOCS = (1000, 1500, 2048, 3000, 4000, 6000)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def excerpt(engine: localctx.Engine, tokens: int) -> str:
    text = (CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    return engine.detokenize(engine.tokenize(text, add_bos=False)[:tokens])


def cli(*args: str, env: dict[str, str], stdin: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "localctx", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"localctx {' '.join(args)} failed:\n{proc.stderr}")
    return proc, wall


def bench_generate(doc: Path, env: dict[str, str]) -> dict[str, Any]:
    runs = {}
    for name, question, extra in (("first", Q1, []), ("second", Q2, []), ("fresh", Q2, ["--no-kv-cache"])):
        log(f"generate: {name} ({question!r}{' ' + extra[0] if extra else ''}) ...")
        proc, wall = cli("generate", "--file", str(doc), question, "--chat", "--preset", PRESET, "--max-tokens",
                         str(ANSWER), "--json", *extra, env=env)
        report = json.loads(proc.stdout)
        t = report["timings"]
        runs[name] = {"wall_s": round(wall, 2), "prompt_tokens": t["prompt_tokens"], "prompt_s": t["prompt_seconds"],
                      "restored_tokens": t["restored_tokens"], "saved_tokens": t["saved_tokens"],
                      "snapshot_s": t["snapshot_seconds"], "snapshot_bytes": t["snapshot_bytes"],
                      "window": report["params"]["n_ctx"], "scaling": report["params"]["scale"],
                      "text": report["text"]}
        log(json.dumps({k: v for k, v in runs[name].items() if k != "text"}))
    return {**runs, "ratio_second_to_first_prompt": round(runs["second"]["prompt_s"] / runs["first"]["prompt_s"], 4),
            "answers_equal": runs["second"]["text"] == runs["fresh"]["text"]}


def first_logits(engine: localctx.Engine, doc: Path) -> tuple[np.ndarray, localctx.Timings]:
    engine.reset_cache()
    prompt = build_prompt(engine, GenerateRequest(Q2, doc, chat=True))
    # One answer token: generation stops before evaluating it, so the last logits are the prompt's.
    gen = engine.generate(prompt.tokens, max_tokens=1, document_end=prompt.document_end).finish()
    return engine.last_logits(), gen.timings


def bench_logits(doc: Path) -> dict[str, Any]:
    with localctx.open_model(preset=PRESET) as engine:
        log("logits: after a restore ...")
        restored, rt = first_logits(engine, doc)
        store, engine.kv_store = engine.kv_store, None
        log("logits: fresh evaluation ...")
        fresh, ft = first_logits(engine, doc)
        engine.kv_store = store
    return {"max_abs_diff": float(np.abs(restored - fresh).max()),
            "argmax_equal": int(restored.argmax()) == int(fresh.argmax()), "restored_tokens": rt.restored_tokens,
            "restore_prompt_s": round(rt.prompt_seconds, 3), "fresh_prompt_s": round(ft.prompt_seconds, 2)}


def bench_load(kv_dir: Path) -> dict[str, Any]:
    [path] = sorted(kv_dir.glob("*/*.kvs"), key=lambda p: p.stat().st_size)[-1:]
    size = path.stat().st_size

    def read(cold: bool) -> float:
        with path.open("rb") as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            buf = bytearray(size)
            start = time.perf_counter()
            f.readinto(buf)
            return time.perf_counter() - start

    cold, warm = read(True), read(False)
    store = KVStore(kv_dir)
    with path.open("rb") as f:
        header = read_header(f)
        tokens = [int(t) for t in np.frombuffer(f.read(4 * header["tokens"]), dtype="<i4")]
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    key = SnapshotKey(header["key"]["model_id"], tuple(header["key"]["params"].items()), header["key"]["build"])
    start = time.perf_counter()
    found = store.find(key, tokens)
    verified_cold = time.perf_counter() - start
    assert found is not None
    return {"file_bytes": size, "tokens": header["tokens"], "bytes_per_token": round(size / header["tokens"]),
            "disk_read_cold_s": round(cold, 3), "disk_read_cold_mb_s": round(size / cold / 1e6),
            "disk_read_warm_s": round(warm, 3), "disk_read_warm_mb_s": round(size / warm / 1e6),
            "find_and_verify_cold_s": round(verified_cold, 3)}


def bench_chat(doc: Path, env: dict[str, str]) -> dict[str, Any]:
    runs = {}
    for name, question, extra in (("first", Q1, []), ("second", Q2, []), ("fresh", Q2, ["--no-kv-cache"])):
        log(f"chat: {name} ...")
        proc, wall = cli("chat", "--file", str(doc), "--preset", PRESET, "-t", "0", "--max-tokens", str(ANSWER),
                         *extra, env=env, stdin=f"{question}\n/stats\n")
        stats = [line for line in proc.stderr.splitlines() if line.startswith("last turn:")]
        kv = [line for line in proc.stderr.splitlines() if line.startswith("[kv]")]
        runs[name] = {"wall_s": round(wall, 2), "last_turn": stats[-1] if stats else None, "kv": kv,
                      "text": proc.stdout.strip()}
        log(json.dumps({k: v for k, v in runs[name].items() if k != "text"}))
    return {**runs, "answers_equal": runs["second"]["text"] == runs["fresh"]["text"]}


def bench_sizes(tmp: Path) -> dict[str, Any]:
    rows = {}
    for kv in ("f16", "q8_0"):
        store_dir = tmp / f"sizes-{kv}"
        os.environ["LOCALCTX_CACHE_DIR"] = str(store_dir)
        with localctx.open_model(preset="native", cache_type=kv) as engine:
            doc = tmp / "doc2k.txt"
            doc.write_text(excerpt(engine, 2048), encoding="utf-8")
            gen = localctx.generate_text(engine, Q1, document=doc, chat=True, max_tokens=1)
        saved = gen.timings.saved_tokens
        rows[kv] = {"tokens": saved, "payload_bytes": gen.timings.snapshot_bytes,
                    "mib_per_1k_tokens": round(gen.timings.snapshot_bytes / saved * 1000 / 2**20, 2)}
        log(f"sizes: {kv} {rows[kv]}")
    return rows


def bench_split(tmp: Path) -> dict[str, Any]:
    """One-pass evaluation against document-then-question, for documents of several lengths."""
    rows = {}
    with localctx.open_model(preset="native", kv_cache=False) as engine:
        slot = engine.slot(0)  # the raw evaluation (n_batch chunks after each cut), without localctx's fixed split

        def logits(toks: list[int], *cuts: int) -> np.ndarray:
            engine.reset_cache()
            prev, last = 0, len(toks) - 1
            for c in list(cuts) + [len(toks)]:
                slot.decode(toks[prev:c], lambda i: i == last)  # logits for the last prompt token only
                prev = c
            return engine.last_logits()

        for n in SPLIT_DOCS:
            doc = tmp / f"doc{n}.txt"
            doc.write_text(excerpt(engine, n), encoding="utf-8")
            prompt = build_prompt(engine, GenerateRequest(Q2, doc, chat=True))
            toks, end = prompt.tokens, prompt.document_end
            whole, split = logits(toks), logits(toks, end)
            rows[str(n)] = {"prompt_tokens": len(toks), "document_tokens": end,
                            "max_abs_diff": float(np.abs(whole - split).max()),
                            "argmax_equal": int(whole.argmax()) == int(split.argmax())}
            log(f"split: {rows[str(n)]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="*", default=["generate", "logits", "load", "chat", "sizes", "split"])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/kvcache.json"))
    ap.add_argument("--kv-dir", type=Path, help="cache directory for the snapshots [default: a temp directory]")
    args = ap.parse_args()
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    tmp = Path(tempfile.mkdtemp(prefix="localctx-kv-bench-"))
    cache = args.kv_dir or tmp / "cache"
    env = {"LOCALCTX_CACHE_DIR": str(cache)}
    os.environ.update(env)
    doc = tmp / "pride_12k.txt"
    with localctx.open_model(preset="native", kv_cache=False) as engine:
        doc.write_text(excerpt(engine, DOC_TOKENS), encoding="utf-8")

    def save() -> None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    cases = {"generate": lambda: bench_generate(doc, env), "logits": lambda: bench_logits(doc),
             "load": lambda: bench_load(cache / "kv"), "chat": lambda: bench_chat(doc, env),
             "sizes": lambda: bench_sizes(tmp), "split": lambda: bench_split(tmp)}
    for name in args.parts:
        if name not in report:
            report[name] = cases[name]()
            save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
