"""Peak process memory of a localctx engine at a FULL window, measured cheaply, against localctx's
own estimate (localctx.memory.estimate).

Each configuration runs in a fresh process (`--one '<json>'`, one JSON line on stdout):

 1. open_engine(RunSpec(model, preset, ctx=N, cache_type, flash_attn[, swa_full], kv_cache=False,
    force=True)); VmRSS and VmHWM after loading (llama.cpp clears its KV buffers when it creates
    them, so the whole cache is resident from here on).
 2. Fill the KV cache to C = N - n_ubatch cells without evaluating C tokens: evaluate R = 256 real
    tokens of Pride and Prejudice, read sequence 0's state (llama_state_seq_get_data), tile its
    per-cell K/V data to C cells at positions 0..C-1 and restore that (llama_state_seq_set_data)
    into the cleared cache. A sliding-window sub-cache (llama.cpp's iSWA memory writes the base
    cache, then the SWA cache) only keeps the cells its window does not mask: with a window-sized
    cache (swa_full False) it gets min(C, n_swa) cells at the LAST positions C-k..C-1 (what a real
    fill leaves unmasked); with a full-size one (swa_full True) C cells at 0..C-1, as a real fill
    leaves them. The restore must return its whole size and llama_memory_seq_pos_max must be C-1.
    The synthetic state is built in an anonymous mmap that is unmapped after the restore; the peak
    (VmHWM) is then reset (`5` > /proc/self/clear_refs), so it does not count.
 3. Decode the last n_ubatch tokens, at positions C..N-1, in ONE batch with logits for ALL of them
    (the worst case localctx reaches: `eval ppl` asks for many logits) at the full depth, copied
    into a NumPy array as Engine.logits_at does.
    peak_rss = max(VmHWM after loading, VmHWM after that decode); also VmRSS at the end.
 4. localctx's estimate for the same facts and parameters, and estimate / peak.

`--validate` checks the trick on the default model at n_ctx 8192 (native, flash attention, f16):
the same process measured after a REAL fill (7,680 tokens evaluated with Slot.extend, then the
same last batch) against the synthetic fill; the peaks should agree within a few MiB.

Configurations: the default model (SmolLM2-135M) at native/8K and yarn-32k/32K, f16 and q8_0 with
flash attention, f16 without (llama.cpp quantizes the V cache only with flash attention, so q8_0 is
not run with it off); and a synthetic Gemma-3-270M-shaped sliding-window model (tests/gguf_runnable:
18 layers, n_embd 640, 4 heads, 1 KV head, head size 160 (the writer derives it from n_embd / n_head;
the real model's is 256), n_ff 2048, trained 32K, window 512, pattern 6) at 8K and 32K with
swa_full True and False (flash attention, f16). Memory only: the machine may be busy; no timing
here is a benchmark. Everything with --validate takes about 7 minutes on a 2-core CPU (the real
8K fill is 1.5 of them; the slowest configuration, the 32K q8_0 last batch, about 2).

    .venv/bin/python benchmarks/bench_memory.py --validate --json benchmarks/results/memory.json
    .venv/bin/python benchmarks/bench_memory.py --configs native-8k-fa-f16,gemma3-32k-swa   # a subset (merged into the JSON)
    .venv/bin/python benchmarks/bench_memory.py --one '{"name": "x", "preset": "native", "ctx": 8192}'
"""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy (see localctx/cli.py)

import argparse
import contextlib
import ctypes
import io
import json
import mmap
import re
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from common import CORPUS, proc_status

from localctx.runtime import RunSpec, open_engine

MiB = 2**20
PROMPT_TOKENS = 256  # R: the real prompt whose per-cell state is tiled
STATE_MAGIC = 0xAF143CD8  # llama_context's io_magic, written before a sequence state (seq_id follows)
SEQ = 0
GEMMA3 = "gemma3-270m-shape"  # stands for the synthetic model's path in a config
GEMMA3_SHAPE = dict(n_layer=18, n_embd=640, n_head=4, n_head_kv=1, n_ff=2048, context=32768, sliding_window=512)
NOTES = [
    "q8_0 is measured with flash attention only: llama.cpp quantizes the V cache only with flash attention on "
    "(localctx's own --cache-type q8_0 turns it on).",
    "The gemma3 model is synthetic (tests/gguf_runnable.write_runnable_model) with Gemma 3 270M's layer count, "
    "width, heads, window and pattern, but head size 160 (n_embd / n_head) instead of 256.",
    "peak_rss is VmHWM: the largest resident set of the process, file-backed model pages included (the model is "
    "mmapped), the synthetic state buffer excluded (unmapped, then the peak reset).",
]


def _config(name: str, preset: str, ctx: int, cache: str, fa: bool, model: str | None = None,
            swa_full: bool | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": name, "model": model, "preset": preset, "ctx": ctx, "cache_type": cache,
                           "flash_attn": fa}
    if swa_full is not None:
        cfg["swa_full"] = swa_full
    return cfg


CONFIGS: dict[str, dict[str, Any]] = {c["name"]: c for c in [
    *(_config(f"{label}-{'fa' if fa else 'nofa'}-{cache}", preset, ctx, cache, fa)
      for label, preset, ctx in (("native-8k", "native", 8192), ("yarn-32k", "yarn-32k", 32768))
      for fa, cache in ((True, "f16"), (True, "q8_0"), (False, "f16"))),
    *(_config(f"gemma3-{ctx // 1024}k-{'swafull' if full else 'swa'}", "native", ctx, "f16", True, GEMMA3, full)
      for ctx in (8192, 32768) for full in (False, True)),
]}
VALIDATION = {"synthetic": {**CONFIGS["native-8k-fa-f16"], "name": "validate-synthetic"},
              "real": {**CONFIGS["native-8k-fa-f16"], "name": "validate-real", "fill": "real"}}


# --- /proc ---------------------------------------------------------------------------------------


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- llama.cpp's sequence state (llama_kv_cache::state_write, vendored llama-kv-cache.cpp) ------


@dataclass
class CacheState:
    """One KV cache's part of a sequence state (a single stream): the cells' positions, then per
    layer K as (type, row size, cells × row bytes) and V either the same (v_trans 0) or transposed
    as (type, element size, n_embd_v_gqa, n_embd_v_gqa × cells × element bytes)."""

    positions: list[int]
    v_trans: int
    k: list[tuple[int, int, memoryview]]
    v: list[tuple[int, int, int, memoryview]]  # (type, row size or element size, n_embd_v_gqa or 0, data)

    @property
    def cells(self) -> int:
        return len(self.positions)


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.off = data, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def bytes(self, n: int) -> memoryview:
        out = self.data[self.off : self.off + n]
        if len(out) != n:
            raise ValueError("sequence state ends early")
        self.off += n
        return out


def parse_state(data: memoryview) -> tuple[bytes, list[CacheState | None]]:
    """(header, caches): the magic and seq_id llama_context writes first, then each cache back to back
    (one, or the base and then the SWA cache of an iSWA memory); None for a cache with no cells."""
    r = _Reader(data)
    header = b""
    if len(data) >= 8 and struct.unpack_from("<I", data, 0)[0] == STATE_MAGIC:
        header = bytes(data[:8])
        r.off = 8
    caches: list[CacheState | None] = []
    while r.off < len(data):
        n_stream = r.take("I")
        if n_stream != 1:
            raise ValueError(f"{n_stream} streams: only a unified KV cache (one stream) is handled")
        cell_count = r.take("I")
        if cell_count == 0:
            caches.append(None)
            continue
        positions = []
        for _ in range(cell_count):
            pos, n_seq_id = r.take("iI")
            if n_seq_id != 1:
                raise ValueError(f"a cell with {n_seq_id} sequences (or a cell extension: M-RoPE/PLE models)")
            r.take("i")
            positions.append(pos)
        v_trans, n_layer = r.take("II")
        k = []
        for _ in range(n_layer):
            typ, row = r.take("iQ")
            k.append((typ, row, r.bytes(cell_count * row)))
        v = []
        for _ in range(n_layer):
            if not v_trans:
                typ, row = r.take("iQ")
                v.append((typ, row, 0, r.bytes(cell_count * row)))
            else:
                typ, el, n_embd = r.take("iII")
                v.append((typ, el, n_embd, r.bytes(n_embd * cell_count * el)))
        caches.append(CacheState(positions, v_trans, k, v))
    return header, caches


def synthetic_size(cache: CacheState | None, cells: int) -> int:
    if cache is None:
        return 8
    size = 8 + cells * 12 + 8
    size += sum(12 + cells * row for _, row, _ in cache.k)
    size += sum((12 + cells * row) if not cache.v_trans else (12 + n_embd * cells * row) for _, row, n_embd, _ in cache.v)
    return size


class _Writer:
    def __init__(self, buf: np.ndarray) -> None:
        self.buf, self.off = buf, 0

    def put(self, data: bytes) -> None:
        self.buf[self.off : self.off + len(data)] = np.frombuffer(data, np.uint8)
        self.off += len(data)

    def tiled(self, src: np.ndarray, cells: int) -> None:
        """`src` (rows × R cells × bytes per cell) repeated along its cells to `cells` cells per row."""
        rows, r, width = src.shape
        dst = self.buf[self.off : self.off + rows * cells * width].reshape(rows, cells, width)
        for start in range(0, cells, r):
            n = min(r, cells - start)
            dst[:, start : start + n] = src[:, :n]
        self.off += rows * cells * width


_CELL = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])


def write_synthetic(w: _Writer, cache: CacheState | None, first: int, cells: int) -> None:
    """One cache's state with `cells` cells at positions first, first + 1, ..., their K/V tiled from
    `cache`'s cells. Written in place, positions in chunks: no temporary over malloc's mmap threshold
    (see synthetic_fill)."""
    if cache is None or cells == 0:
        w.put(struct.pack("<II", 1, 0))
        return
    w.put(struct.pack("<II", 1, cells))
    meta = w.buf[w.off : w.off + cells * _CELL.itemsize].view(_CELL)
    meta["n_seq_id"], meta["seq_id"] = 1, SEQ
    for start in range(0, cells, 8192):
        n = min(8192, cells - start)
        meta["pos"][start : start + n] = np.arange(first + start, first + start + n, dtype=np.int32)
    w.off += cells * _CELL.itemsize
    w.put(struct.pack("<II", cache.v_trans, len(cache.k)))
    r = cache.cells
    for typ, row, data in cache.k:
        w.put(struct.pack("<iQ", typ, row))
        w.tiled(np.frombuffer(data, np.uint8).reshape(1, r, row), cells)
    for typ, size, n_embd, data in cache.v:
        if not cache.v_trans:
            w.put(struct.pack("<iQ", typ, size))
            w.tiled(np.frombuffer(data, np.uint8).reshape(1, r, size), cells)
        else:
            w.put(struct.pack("<iII", typ, size, n_embd))
            w.tiled(np.frombuffer(data, np.uint8).reshape(n_embd, r, size), cells)


def read_state(engine: Any) -> mmap.mmap:
    """Sequence 0's state, in an anonymous mapping (see synthetic_fill): llama.cpp's own calls on
    the context's pointer, not Context.state, whose ctypes buffer is malloc'ed."""
    ctx = engine.lane.ctx.ptr
    size = llama_cpp.llama_state_seq_get_size(ctx, SEQ)
    mm = mmap.mmap(-1, size)
    buf = (ctypes.c_uint8 * size).from_buffer(mm)
    written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, SEQ)
    del buf
    if written != size:
        mm.close()
        raise RuntimeError(f"llama.cpp wrote {written} bytes of a {size}-byte sequence state")
    return mm


def synthetic_fill(engine: Any, tokens: list[int], cells: int, swa_full: bool) -> dict[str, Any]:
    """Evaluate `tokens`, then replace the cache by `cells` cells tiled from their state.

    Both states live in anonymous mappings, unmapped before returning: a large block freed through
    malloc would raise glibc's dynamic mmap threshold, after which the decode's own temporaries would
    stay resident on the heap (measured: 12 MiB more peak than a real fill at 2K when the source state
    was read into malloc'ed buffers)."""
    engine.slot(SEQ).extend(0, list(tokens))
    n_swa = engine.model.n_swa
    source = read_state(engine)
    target = None
    try:
        engine.reset_cache()
        info, target = _restore_tiled(engine, source, cells, swa_full, n_swa)
    finally:
        # (after an error, a traceback may still hold views of them: then they go with the process)
        with contextlib.suppress(BufferError):
            source.close()
            if target is not None:
                target.close()
    return {"prompt_tokens": len(tokens), "n_swa": n_swa, **info}


def _restore_tiled(engine: Any, source: mmap.mmap, cells: int, swa_full: bool,
                   n_swa: int) -> tuple[dict[str, Any], mmap.mmap]:
    # Every view of the two mappings is local here, so both can be closed once this returns.
    header, caches = parse_state(memoryview(source))
    plan = []  # (cache, cells, swa) per cache: the base cache first, the SWA cache last
    for i, cache in enumerate(caches):
        swa = len(caches) == 2 and i == 1
        plan.append((cache, cells if not swa or swa_full else min(cells, n_swa), swa))
    total = len(header) + sum(synthetic_size(c, k) for c, k, _ in plan)
    mm = mmap.mmap(-1, total)
    w = _Writer(np.frombuffer(mm, np.uint8))
    w.put(header)
    for cache, k, _ in plan:
        write_synthetic(w, cache, cells - k, k)  # the last k positions: 0..C-1 when k == C
    if w.off != total:
        raise AssertionError(f"synthetic state is {w.off} bytes, expected {total}")
    read = llama_cpp.llama_state_seq_set_data(engine.lane.ctx.ptr,
                                              (ctypes.c_uint8 * total).from_buffer(mm), total, SEQ)
    rss_with_buffer = proc_status()["VmRSS"]
    info = {"state_bytes": total, "source_state_bytes": len(source), "rss_with_state_buffers": rss_with_buffer,
            "caches": [{"swa": swa, "source_cells": c.cells if c else 0, "cells": k,
                        "positions": [cells - k, cells - 1] if k else None,
                        "v_trans": c.v_trans if c else None} for c, k, swa in plan]}
    del header, caches, plan, w
    if read != total:
        mm.close()
        raise RuntimeError(f"llama.cpp refused the synthetic state of {cells} cells (read {read} of {total} bytes)")
    return info, mm


def decode_last_batch(engine: Any, tokens: list[int], start: int) -> np.ndarray:
    """`tokens` at positions start, start + 1, ... in one batch, logits for every one, copied out
    as Engine.logits_at returns them (eval ppl holds that copy while it scores)."""
    ctx = engine.lane.ctx
    b = ctx.batch
    b.clear()
    rows = [b.add(tok, start + j, SEQ, True) for j, tok in enumerate(tokens)]
    ctx.decode(b)
    out = np.empty((len(tokens), engine.n_vocab), dtype=np.float32)
    for j, row in enumerate(rows):
        out[j] = np.ctypeslib.as_array(ctx.logits(row), shape=(engine.n_vocab,))
    return out


# --- one configuration (a child process) ---------------------------------------------------------


_LOG_LINE = re.compile(r"buffer size|KV cache|cells|n_ctx|n_swa|swa", re.I)


def _log_summary(log: str) -> dict[str, Any]:
    kv = [float(m) for m in re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", log)]
    compute = [float(m) for m in re.findall(r"compute buffer size\s*=\s*([\d.]+) MiB", log)]
    output = [float(m) for m in re.findall(r"output buffer size\s*=\s*([\d.]+) MiB", log)]
    lines = [ln.strip() for ln in log.splitlines()
             if _LOG_LINE.search(ln) and ln.startswith(("llama_kv", "llama_context", "llama_memory", "llama_init"))]
    return {"kv_mib": round(sum(kv), 2), "compute_mib": round(sum(compute), 2), "output_mib": round(sum(output), 2),
            "lines": lines[:40]}


def _estimate(engine: Any, peak: int) -> dict[str, Any]:
    try:
        from localctx.memory import estimate

        est = estimate(engine.facts, engine.params)
        detail = est.to_dict() if hasattr(est, "to_dict") else asdict(est) if is_dataclass(est) else None
        return {"estimate_total": int(est.total), "estimate": detail, "ratio": round(est.total / peak, 4)}
    except Exception as exc:  # the estimate is being reworked: a measurement must not depend on it
        return {"estimate_error": f"{type(exc).__name__}: {exc}"}


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    kwargs = {k: cfg[k] for k in ("model", "preset", "ctx", "cache_type", "flash_attn") if cfg.get(k) is not None}
    if "swa_full" in cfg:
        kwargs["swa_full"] = cfg["swa_full"]
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):  # llama.cpp's log (verbose): KV and compute buffer sizes
        engine = open_engine(RunSpec(**kwargs, kv_cache=False, force=True, verbose=True))
    localctx.engine.set_llama_log(False)
    out: dict[str, Any] = {"config": cfg}
    try:
        loaded = proc_status()
        n, ub = engine.n_ctx, engine.params.n_ubatch
        cells = n - ub
        out.update(n_ctx=n, params=engine.params.to_dict(), rss_after_load=loaded["VmRSS"],
                   hwm_after_load=loaded["VmHWM"], rss_file_after_load=loaded.get("RssFile"),
                   llama_log=_log_summary(captured.getvalue()))
        tokens = engine.tokenize((CORPUS / "pride_and_prejudice.txt").read_text(encoding="utf-8"))
        if len(tokens) < n:
            raise RuntimeError(f"the corpus has {len(tokens)} tokens, fewer than the window's {n}")
        t = time.perf_counter()
        if cfg.get("fill", "synthetic") == "real":
            engine.slot(SEQ).extend(0, tokens[:cells])
            out["fill"] = {"kind": "real", "evaluated_tokens": cells}
        else:
            out["fill"] = {"kind": "synthetic",
                           **synthetic_fill(engine, tokens[:PROMPT_TOKENS], cells, bool(engine.params.swa_full))}
        out["fill"]["seconds"] = round(time.perf_counter() - t, 1)
        ctx = engine.lane.ctx
        pos_max, pos_min = ctx.pos_max(SEQ), ctx.pos_min(SEQ)
        out["fill"].update(pos_min=pos_min, pos_max=pos_max)
        if pos_max != cells - 1:
            raise RuntimeError(f"after the fill the cache's last position is {pos_max}, expected {cells - 1}")
        filled = proc_status()
        out.update(rss_after_fill=filled["VmRSS"], hwm_after_fill=filled["VmHWM"])
        out["peak_reset"] = reset_peak()
        before = proc_status()["VmRSS"]
        t = time.perf_counter()
        logits = decode_last_batch(engine, tokens[cells:n], cells)
        out["decode"] = {"tokens": n - cells, "positions": [cells, n - 1], "logits": n - cells,
                         "seconds": round(time.perf_counter() - t, 1),
                         "pos_max_after": ctx.pos_max(SEQ)}
        end = proc_status()
        del logits
        out.update(rss_before_decode=before, hwm_decode=end["VmHWM"], rss_end=end["VmRSS"])
        # The synthetic buffer is excluded (unmapped, then the peak reset); a real fill's own peak counts.
        synthetic = out["fill"]["kind"] == "synthetic"
        if synthetic and not out["peak_reset"]:
            out["warning"] = "VmHWM could not be reset: peak_rss includes the synthetic state buffer"
        out["peak_rss"] = max(loaded["VmHWM"], end["VmHWM"], 0 if synthetic else filled["VmHWM"])
        out.update(_estimate(engine, out["peak_rss"]))
    finally:
        engine.close()
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


# --- the parent ------------------------------------------------------------------------------------


def run_child(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": cfg, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:],
                "seconds": round(time.perf_counter() - t, 1)}
    return json.loads(lines[-1])


def write_gemma3(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_runnable import write_runnable_model

    return write_runnable_model(directory / "gemma3-270m-shape.gguf", "gemma3", **GEMMA3_SHAPE)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    out = ["| config | n_ctx | KV (llama.cpp log) MiB | RSS after load MiB | measured peak MiB | estimate MiB | "
           "estimate / peak |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | - | - | - | error: {r['error']} | - | - |")
            continue
        kv = r.get("llama_log", {}).get("kv_mib")
        out.append(f"| {name} | {r['n_ctx']:,} | {kv:,.1f} | {mib(r['rss_after_load'])} | {mib(r['peak_rss'])} | "
                   f"{mib(r.get('estimate_total'))} | {r.get('ratio', '-')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="all",
                    help=f"comma-separated names, 'all' or 'none' (names: {', '.join(CONFIGS)})")
    ap.add_argument("--validate", action="store_true", help="also compare a real 8K fill with the synthetic one")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/memory.json"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration [3600]")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))), flush=True)
        return
    names = list(CONFIGS) if args.configs == "all" else [] if args.configs == "none" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    report["notes"] = NOTES
    rows: dict[str, dict[str, Any]] = report.setdefault("configs", {})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gemma3 = str(write_gemma3(Path(tmp))) if any(CONFIGS[n]["model"] == GEMMA3 for n in names) else None
        for name in names:
            cfg = dict(CONFIGS[name])
            if cfg["model"] == GEMMA3:
                cfg["model"] = gemma3
            rows[name] = run_child(cfg, args.timeout)
            rows[name]["config"]["name"] = name
            print(f"{name}: peak {mib(rows[name].get('peak_rss'))} MiB, estimate "
                  f"{mib(rows[name].get('estimate_total'))} MiB {rows[name].get('error', '')}", file=sys.stderr, flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.validate:
        v = {kind: run_child(cfg, args.timeout) for kind, cfg in VALIDATION.items()}
        if all("peak_rss" in r for r in v.values()):
            v["difference_mib"] = {key: round((v["synthetic"][key] - v["real"][key]) / MiB, 2)
                                   for key in ("peak_rss", "hwm_decode", "rss_end", "rss_before_decode",
                                               "rss_after_load")}
        report["validation"] = v
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    for note in NOTES:
        print(f"- {note}")
    if args.validate:
        v = report["validation"]
        for kind in ("real", "synthetic"):
            r = v[kind]
            print(f"validation {kind} fill: " + (f"peak {mib(r['peak_rss'])} MiB, last-batch peak {mib(r['hwm_decode'])} "
                                                 f"MiB, end {mib(r['rss_end'])} MiB" if "peak_rss" in r else r.get("error", "")))
        if "difference_mib" in v:
            print(f"validation synthetic - real (MiB): {v['difference_mib']}")
    print(f"total {report['seconds']:.0f} s; written to {args.json}")


if __name__ == "__main__":
    main()
