"""Memory estimate before loading: model weights + KV cache + compute buffers, against what is free."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import psutil

from .errors import ResourceError
from .gguf_meta import ModelFacts
from .params import KV_CACHE_TYPES, RuntimeParams
from .presets import best_preset

# Lets users (and tests) cap what localctx may use, e.g. to leave room for other programs.
MEMORY_LIMIT_ENV = "LOCALCTX_MEMORY_LIMIT"
# The process before any window: Python, numpy, llama.cpp's code and the model's vocabulary
# structures (calibrated against benchmarks/bench_memory.py: see benchmarks/RESULTS.md section 10).
_OVERHEAD = 80 * 2**20
_VOCAB_OVERHEAD = 256  # bytes per vocabulary entry held by llama.cpp and llama-cpp-python
_PAD = 256  # llama.cpp rounds a context's cells up to a multiple of this
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ (llama-cparams.h): a context refuses more


@dataclass(frozen=True)
class Workload:
    """What a context will be asked to do, as far as memory goes: how many sequences share it and
    how many logits a batch returns. llama.cpp keeps one row of n_vocab floats per output of a
    batch, and at least one per sequence (llama_context::output_reserve), and the graph's logits
    tensor has as many rows, so generating (one output per sequence: generate, chat, serve) and
    scoring (an output for each scored position of a batch: eval ppl, `Engine.logits_at`) differ by
    up to n_batch - 1 rows: 1 GiB at Gemma 3's vocabulary (262,144) and a 512-token batch.

    `n_seq` sequences are planned as the engine opens them (n_seq_max = n_seq, n_ctx = n_seq x the
    window, kv_unified off): llama.cpp gives each sequence a stream of its own window of cells,
    and its sliding-window layers their window plus a micro-batch, each."""

    kind: Literal["generate", "score"] = "score"
    n_seq: int = 1
    # Results that must not depend on threads or on what ran beside them (eval, summarize, Ray):
    # the context holds one more stream (engine.backend.Context), planned here like a sequence.
    exact: bool = False

    @property
    def streams(self) -> int:
        return self.n_seq + (1 if self.exact else 0)

    def __post_init__(self) -> None:
        if self.kind not in ("generate", "score"):
            raise ValueError(f"Workload kind must be 'generate' or 'score', not {self.kind!r}")
        n = self.n_seq
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SEQUENCES:
            raise ResourceError(f"The number of parallel sequences must be from 1 to {MAX_SEQUENCES} "
                                f"(llama.cpp's limit), not {n!r}.")

    def outputs(self, n_batch: int) -> int:
        """Logits rows of one batch: llama.cpp's output buffer never holds fewer than n_seq."""
        return self.n_seq if self.kind == "generate" else max(n_batch, self.n_seq)


# The safe default (the most logits a localctx context returns), and what text generation needs.
SCORE = Workload("score")
GENERATE = Workload("generate")
EXACT_SCORE = Workload("score", exact=True)  # eval cells: the same result on any machine's thread count


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model at a context takes in memory, in bytes. `kv_bytes` includes the sliding-window
    layers' cache, `kv_sliding_bytes`; `kv_sliding_full_bytes` is what they would take with the
    full-size cache (`swa_full`), so the saving shows."""

    model_bytes: int
    kv_bytes: int
    compute_bytes: int
    kv_sliding_bytes: int = 0
    kv_sliding_full_bytes: int = 0
    compute_buffer_bytes: int = 0  # part of compute_bytes: llama.cpp's graph buffer
    output_bytes: int = 0  # part of compute_bytes: a batch's logits (llama.cpp's and localctx's copy)
    overhead_bytes: int = 0  # part of compute_bytes: the process before any window

    @property
    def total(self) -> int:
        return self.model_bytes + self.kv_bytes + self.compute_bytes

    def to_dict(self) -> dict[str, int]:
        return {"total_bytes": self.total, "model_bytes": self.model_bytes, "kv_bytes": self.kv_bytes,
                "kv_sliding_bytes": self.kv_sliding_bytes, "kv_sliding_full_bytes": self.kv_sliding_full_bytes,
                "compute_bytes": self.compute_bytes, "compute_buffer_bytes": self.compute_buffer_bytes,
                "output_bytes": self.output_bytes, "overhead_bytes": self.overhead_bytes}


def _pad(n: int) -> int:
    return -(-n // _PAD) * _PAD


def sliding_cells(facts: ModelFacts, n_ctx: int, *, n_ubatch: int = 512, swa_full: bool = False,
                  n_seq: int = 1) -> int:
    """Cells of the sliding-window layers' cache for `n_seq` sequences of `n_ctx` tokens, each in
    its own stream (kv_unified off): the whole (padded) window with `swa_full`, else llama.cpp's
    window plus one micro-batch (llama-kv-cache-iswa.cpp: n_swa + n_ubatch per stream)."""
    cells = _pad(n_ctx)
    if not facts.sliding_window or swa_full:
        return n_seq * cells
    return n_seq * min(cells, _pad(facts.sliding_window + min(n_ubatch, n_ctx)))


def estimate(facts: ModelFacts, params: RuntimeParams, workload: Workload = SCORE) -> MemoryEstimate:
    """Weights (mapped, all touched while running), the KV cache (zeroed at creation, so resident
    at once), llama.cpp's compute buffer as it reserves it (the worst-case graph: a full
    micro-batch against a full cache), the CPU backend's work buffer, the logits the workload asks
    for and the process's own overhead.

    `params.n_ctx` is the window of one sequence; the cache is planned for `workload.n_seq` of
    them, a stream of n_ctx cells each (see Workload). Logits: a scoring workload
    is charged a whole batch of them, a generating one a row per sequence. The compute buffer is
    reserved for a micro-batch of outputs, but on the CPU its pages become resident only when a
    graph writes them, and a generating graph's logits tensor has one row per sequence."""
    n_seq = workload.streams
    n_cells = n_seq * params.n_ctx
    n_kv = _pad(n_cells)
    swa = sliding_cells(facts, params.n_ctx, n_ubatch=params.n_ubatch, swa_full=params.swa_full, n_seq=n_seq)
    full_cell, sliding_cell = facts.kv_bytes_per_cell(params.type_k, params.type_v)
    kv = int(full_cell * n_kv + sliding_cell * swa)
    t, fa = min(params.n_ubatch, params.n_batch, n_cells), params.flash_attn
    h, h_kv, dk, dv = max(facts.n_heads, 1), facts.n_heads_kv, facts.head_dim_k, facts.head_dim_v
    e, ff, vocab = max(facts.n_embd, 1), facts.n_ff or 4 * max(facts.n_embd, 1), facts.n_vocab
    rows = workload.outputs(min(params.n_batch, n_cells))  # logits rows of a batch
    # Live for the whole graph: positions, output ids, the attention masks (f16 with flash
    # attention, f32 without; a second one for sliding layers).
    masks = [n_kv] + ([swa] if facts.sliding_window else [])
    inputs = 4 * t * 3 + 8 * t * (1 if fa else h_kv * dv) + sum(m * t * (2 if fa else 4) for m in masks)
    attention = 4 * t * (h * (dk + dv) + h_kv * (dk + dv) + 2 * e) + (0 if fa else 4 * t * h * n_kv)
    ffn = 4 * t * (3 * ff + 2 * e)
    logits = 4 * (min(rows, t) * vocab + 2 * t * e)
    buffer = inputs + max(attention, ffn, logits)
    # The CPU backend's scratch: activations quantized for the matrix products, and without flash
    # attention the KQ scores again in f16.
    work = ff * t + (0 if fa else 2 * h * n_kv * t)
    # The batch's logits twice: llama.cpp's output buffer (zeroed when reserved, so resident) and
    # the copy localctx takes (Engine.logits_at's array; a sampled row).
    outputs = 2 * 4 * vocab * rows
    overhead = _OVERHEAD + _VOCAB_OVERHEAD * vocab + 4 * n_cells
    return MemoryEstimate(
        model_bytes=facts.file_size, kv_bytes=kv, compute_bytes=buffer + work + outputs + overhead,
        kv_sliding_bytes=int(sliding_cell * swa), kv_sliding_full_bytes=int(sliding_cell * n_kv),
        compute_buffer_bytes=buffer, output_bytes=outputs, overhead_bytes=overhead,
    )


def available_bytes() -> int:
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        return parse_size(limit)
    return int(psutil.virtual_memory().available)


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """A memory size such as 8G, 512MiB or 1.5g, in bytes. Only digits and a unit are accepted, so
    inf, nan and negative sizes are refused rather than reaching the estimate."""
    match = _SIZE.fullmatch(text.strip().lower())
    size = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
    if size < 1:
        raise ResourceError(
            f"{MEMORY_LIMIT_ENV}={text!r} is not a memory size: use a positive number with an optional unit, "
            "such as 8G, 512M or 1.5GiB (or unset it to use the memory available)."
        )
    return size


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(facts: ModelFacts, params: RuntimeParams, *, gpu_layers: int = 0, force: bool = False,
                 available: Callable[[], int] | None = None, workload: Workload = SCORE) -> MemoryEstimate:
    """Refuse to load when the estimate for `workload` exceeds free memory (`available`, default:
    what the system reports), naming what would fit. With n_seq sequences the plan is n_seq
    windows of params.n_ctx cells (see Workload), and the refusal says so."""
    est = estimate(facts, params, workload)
    # With layers on a GPU the weights and cache leave system memory; its size is not known here.
    if force or gpu_layers != 0:
        return est
    free = (available or available_bytes)()
    if est.total <= free:
        return est
    n_seq = workload.n_seq
    parts = (f"(model {human(est.model_bytes)}, KV cache {human(est.kv_bytes)} as {params.type_k}/{params.type_v}"
             f"{_sliding_note(facts, params, est, n_seq)}, compute {human(est.compute_bytes)})")
    needs = (f" at {params.n_ctx:,} tokens: it needs about {human(est.total)}" if n_seq == 1 else
             f", planned for {n_seq} sequences of {params.n_ctx:,} tokens: {human(est.total)}")
    raise ResourceError(
        f"Not enough memory for {facts.name}{needs} {parts} and {human(free)} is available.\n"
        + _suggestions(facts, params, free, workload)
        + "\nPass --force to try anyway."
    )


def _sliding_note(facts: ModelFacts, params: RuntimeParams, est: MemoryEstimate, n_seq: int = 1) -> str:
    if not facts.sliding_window:
        return ""
    if params.swa_full:
        return f"; its {facts.n_sliding_layers} sliding-window layers at the full window"
    last = f"last {facts.sliding_window:,} tokens" + (" of each sequence" if n_seq > 1 else "")
    return (f"; its {facts.n_sliding_layers} sliding-window layers keep {human(est.kv_sliding_bytes)} for the "
            f"{last} instead of {human(est.kv_sliding_full_bytes)}")


def _suggestions(facts: ModelFacts, params: RuntimeParams, free: int, workload: Workload = SCORE) -> str:
    def fits(candidate: RuntimeParams, load: Workload = workload) -> bool:
        return estimate(facts, candidate, load).total <= free

    lines = []
    if facts.sliding_window and params.swa_full:
        alt = estimate(facts, params.with_ctx_settings(swa_full=False), workload)
        if alt.total <= free:
            lines.append(f"  - the window-sized sliding-window cache fits ({human(alt.total)}): --no-swa-full")
    for cache in ("q8_0", "q4_0"):
        if KV_CACHE_TYPES[cache] < KV_CACHE_TYPES[params.type_k]:
            alt = estimate(facts, params.with_ctx_settings(type_k=cache, type_v=cache, flash_attn=True), workload)
            if alt.total <= free:
                lines.append(f"  - a {cache} KV cache fits ({human(alt.total)}): --cache-type {cache}")
                break
    fewer = next((n for n in range(workload.n_seq - 1, 0, -1) if fits(params, replace(workload, n_seq=n))), 0)
    if fewer:
        lines.append(f"  - fewer sequences fit: up to {fewer} of {params.n_ctx:,} tokens (--parallel {fewer})")
    smaller = _largest_preset_that_fits(facts, params, fits)
    if smaller:
        lines.append(f"  - a smaller preset fits: --preset {smaller}")
    window = _largest_window(params, fits)
    if window >= 1024:
        per = " per sequence" if workload.n_seq > 1 else ""
        lines.append(f"  - a window of up to about {window:,} tokens{per} fits: --preset auto --ctx {window}")
    return "What would fit:\n" + "\n".join(lines) if lines else "Nothing smaller fits either; free some memory."


def _largest_window(params: RuntimeParams, fits: Callable[[RuntimeParams], bool]) -> int:
    """The largest window (a multiple of 1,024 below the one asked for) that `fits`: searched,
    since the sliding layers' cache stops growing at their window and the compute buffer grows
    with it."""
    lo, hi = 0, params.n_ctx // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(params.with_ctx_settings(n_ctx=mid * 1024)):
            lo = mid
        else:
            hi = mid - 1
    return lo * 1024 if lo * 1024 < params.n_ctx else 0


def _largest_preset_that_fits(facts: ModelFacts, params: RuntimeParams,
                              fits: Callable[[RuntimeParams], bool]) -> str | None:
    def smaller_and_fits(_: object, candidate: RuntimeParams) -> bool:
        return candidate.n_ctx < params.n_ctx and fits(candidate)

    # The largest window first; on a tie, the method the user asked for.
    return best_preset(facts, smaller_and_fits,
                       lambda _, candidate: (candidate.n_ctx, candidate.method == params.method))
