"""Memory estimate before loading: model weights + KV cache + compute buffers, against what is free."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from .errors import ResourceError
from .gguf_meta import ModelFacts
from .params import KV_CACHE_TYPES, RuntimeParams
from .presets import best_preset

# Lets users (and tests) cap what localctx may use, e.g. to leave room for other programs.
MEMORY_LIMIT_ENV = "LOCALCTX_MEMORY_LIMIT"
_OVERHEAD = 96 * 2**20  # ggml graph metadata, tokenizer, Python objects


@dataclass(frozen=True)
class MemoryEstimate:
    model_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def total(self) -> int:
        return self.model_bytes + self.kv_bytes + self.compute_bytes


def estimate(facts: ModelFacts, params: RuntimeParams) -> MemoryEstimate:
    kv = facts.kv_cache_bytes(params.n_ctx, params.type_k, params.type_v)
    # Logits for one micro-batch (llama.cpp) and one batch (llama-cpp-python's score buffer).
    logits = (params.n_ubatch + params.n_batch) * facts.n_vocab * 4
    # Without flash attention the KQ scores of a micro-batch are materialised, and at full depth the
    # process needs more than one such matrix (a filled 32K window peaked at 1,830 MiB where counting
    # one gave 1,696: benchmarks/RESULTS.md section 2), so two are counted.
    kq = 0 if params.flash_attn else 2 * params.n_ubatch * params.n_ctx * max(facts.n_heads, 1) * 4
    activations = params.n_ubatch * max(facts.n_embd, 1) * 4 * 16
    return MemoryEstimate(facts.file_size, kv, logits + kq + activations + _OVERHEAD)


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
                 available: Callable[[], int] | None = None) -> MemoryEstimate:
    """Refuse to load when the estimate exceeds free memory (`available`, default: what the system
    reports), naming what would fit."""
    est = estimate(facts, params)
    # With layers on a GPU the weights and cache leave system memory; its size is not known here.
    if force or gpu_layers != 0:
        return est
    free = (available or available_bytes)()
    if est.total <= free:
        return est
    raise ResourceError(
        f"Not enough memory for {facts.name} at {params.n_ctx:,} tokens: it needs about {human(est.total)} "
        f"(model {human(est.model_bytes)}, KV cache {human(est.kv_bytes)} as {params.type_k}/{params.type_v}, "
        f"compute {human(est.compute_bytes)}) and {human(free)} is available.\n"
        + _suggestions(facts, params, free)
        + "\nPass --force to try anyway."
    )


def _suggestions(facts: ModelFacts, params: RuntimeParams, free: int) -> str:
    lines = []
    for cache in ("q8_0", "q4_0"):
        if KV_CACHE_TYPES[cache] < KV_CACHE_TYPES[params.type_k]:
            alt = estimate(facts, params.with_ctx_settings(type_k=cache, type_v=cache, flash_attn=True))
            if alt.total <= free:
                lines.append(f"  - a {cache} KV cache fits ({human(alt.total)}): --cache-type {cache}")
                break
    smaller = _largest_preset_that_fits(facts, params, free)
    if smaller:
        lines.append(f"  - a smaller preset fits: --preset {smaller}")
    budget = free - facts.file_size - estimate(facts, params).compute_bytes
    per_token = facts.kv_cache_bytes(1, params.type_k, params.type_v)
    if budget > 0 and per_token:
        fits = int(budget // per_token) // 1024 * 1024
        if fits >= 1024:
            lines.append(f"  - a window of up to about {fits:,} tokens fits: --preset auto --ctx {fits}")
    return "What would fit:\n" + "\n".join(lines) if lines else "Nothing smaller fits either; free some memory."


def _largest_preset_that_fits(facts: ModelFacts, params: RuntimeParams, free: int) -> str | None:
    def smaller_and_fits(_: object, candidate: RuntimeParams) -> bool:
        return candidate.n_ctx < params.n_ctx and estimate(facts, candidate).total <= free

    # The largest window first; on a tie, the method the user asked for.
    return best_preset(facts, smaller_and_fits,
                       lambda _, candidate: (candidate.n_ctx, candidate.method == params.method))
