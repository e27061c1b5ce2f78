"""Conversion speed and memory: `localctx convert` against a plain `cp` of the same file, in the same
run, on a multi-GB synthetic GGUF and on the default model. Prints a Markdown table.

Targets: conversion time <= 1.5x cp, peak RSS of the conversion < 200 MB.

    .venv/bin/python benchmarks/bench_convert.py [--gib 3] [--reps 3] [--dir /tmp] [--results FILE]

Every timed copy reads its source from the page cache (the source is read once beforehand and the
runs are interleaved cp, cp+sync, convert, ...), and each output is deleted, and the page cache
flushed (untimed), right after its run.
The conversion fsyncs its output before renaming it (that is what makes it crash-safe) and cp does
not, so cp is also timed followed by `sync FILE` (the fair comparison). Peak RSS is the converting
process's own maximum resident set size, measured by GNU time (`/usr/bin/time -f %M`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

import localctx

PIECE = 256 * 2**20  # synthetic tensors of 256 MiB, written from one reused random buffer


def write_synthetic(path: Path, total: int) -> Path:
    """A llama-shaped GGUF header with `total` bytes of incompressible tensor data, written in
    pieces so this script's own memory stays small."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bench-synthetic")
    w.add_context_length(4096)
    w.add_embedding_length(4096)
    w.add_block_count(32)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(128)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    n = max(1, total // PIECE)
    for i in range(n):
        w.add_tensor_info(f"blk.{i}.blob.weight", (PIECE // 4,), np.dtype(np.float32), PIECE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2**32, PIECE // 4, dtype=np.uint32).view(np.float32)
    for i in range(n):
        data[:4] = i  # no two pieces identical
        w.write_tensor_data(data)
    w.close()
    return path


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 * 2**20):
            pass


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and the command's own peak RSS in bytes. GNU time measures it: a child forked
    from this (large) benchmark process would report this process's RSS as its own peak."""
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    full = [time_bin, "-f", "%M", *cmd] if time_bin else cmd
    start = time.perf_counter()
    proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1]) if time_bin else 0
    return seconds, rss_kib * 1024


def bench(src: Path, workdir: Path, reps: int) -> dict[str, list[float] | int]:
    out = workdir / "out.gguf"
    warm(src)
    convert = [sys.executable, "-m", "localctx", "convert", str(src), str(out), "--preset", "yarn-32k", "--force"]
    cp = ["cp", "--reflink=never", str(src), str(out)]
    cp_sync = ["sh", "-c", f'cp --reflink=never "{src}" "{out}" && sync "{out}"']
    results: dict[str, list[float] | int] = {"cp": [], "cp+sync": [], "convert": [], "rss": 0}
    for _ in range(reps):
        for name, cmd in (("cp", cp), ("cp+sync", cp_sync), ("convert", convert)):
            seconds, rss = timed(cmd)
            results[name].append(seconds)  # type: ignore[union-attr]
            if name == "convert":
                results["rss"] = max(int(results["rss"]), rss)
            out.unlink()
            os.sync()  # untimed: one run's dirty pages must not be written back during the next
    return results


def row(label: str, size: int, r: dict) -> str:
    best = {k: min(v) for k, v in r.items() if k != "rss"}
    runs = lambda k: " / ".join(f"{s:.2f}" for s in r[k])  # noqa: E731
    return (f"| {label} | {size / 2**30:.2f} GiB | {runs('cp')} | {runs('cp+sync')} | {runs('convert')} | "
            f"{best['convert'] / best['cp']:.2f}x | {best['convert'] / best['cp+sync']:.2f}x | "
            f"{r['rss'] / 2**20:.0f} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=3.0, help="size of the synthetic model [3]")
    ap.add_argument("--reps", type=int, default=3, help="runs of each command [3]")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="scratch directory [/tmp]")
    ap.add_argument("--results", type=Path, help="also append the table to this Markdown file")
    args = ap.parse_args()
    size = int(args.gib * 2**30)
    free = shutil.disk_usage(args.dir).free
    if free < 2.2 * size:
        raise SystemExit(f"{args.dir} has {free / 2**30:.1f} GiB free; this needs {2.2 * size / 2**30:.1f} GiB.")
    lines = ["| file | size | cp s (runs) | cp+sync s | convert s | convert/cp | convert/(cp+sync) | convert peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-convert-") as tmp:
        work = Path(tmp)
        print(f"writing a {args.gib:g} GiB synthetic GGUF in {work} ...", file=sys.stderr)
        big = write_synthetic(work / "synthetic.gguf", size)
        lines.append(row("synthetic (random f32)", big.stat().st_size, bench(big, work, args.reps)))
        big.unlink()
        model = localctx.read_model_facts().path
        lines.append(row(model.name, model.stat().st_size, bench(model, work, args.reps)))
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(f"\n{time.strftime('%Y-%m-%d %H:%M')}, `{' '.join(sys.argv)}`, {os.cpu_count()} CPUs\n\n{table}\n")


if __name__ == "__main__":
    main()
