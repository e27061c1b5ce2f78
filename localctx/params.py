"""RuntimeParams, the seam of localctx, and the vocabularies it is made of (KV cache types,
devices). Each is declared here once: the engine maps them to llama.cpp, the CLI offers them as
choices, the memory estimate and the GGUF facts size the cache with them.

The engine loads a model with RuntimeParams, the converter writes them into GGUF metadata,
`presets show` prints them as llama.cpp flags, and eval records them beside its numbers.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Union

# Bytes per element of each KV cache type llama.cpp offers for K and V (q8_0: 34-byte blocks of
# 32 values, q4_0: 18-byte blocks of 32).
KV_CACHE_TYPES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# The context windows localctx accepts, in tokens (--ctx, RunSpec.ctx, a resolved n_ctx). llama.cpp
# takes n_ctx as a C uint32 and would silently wrap a larger value; 16M tokens is past the trained
# window of any current model (Llama 4 Scout's is 10M).
MIN_CTX = 16
MAX_CTX = 2**24
C_INT_MAX = 2**31 - 1  # threads and GPU layers are C ints in llama.cpp
MAX_SEED = 2**32 - 1  # llama.cpp's seed is a uint32: a larger one would wrap silently

# Where a model runs: "auto" offloads every layer when the build can, else runs on the CPU.
DEVICES = ("auto", "cpu", "cuda", "metal")
# The GPU devices, with the name of the ggml backend each needs in the llama.cpp build.
GPU_BACKENDS = {"cuda": "CUDA", "metal": "Metal"}

# The RuntimeParams fields that never change what a model computes: the preset's name (two presets,
# or an `auto` step, that resolve to the same values compute the same thing) and the notes (prose).
# Every key of stored results holds all the others (`result_params`), as `to_dict` writes them.
NON_RESULT_FIELDS = ("preset", "notes")
# Of those, the ones that change what the KV cache holds for given tokens: the window (n_ctx) and
# batch sizes do not, since the same tokens under the same RoPE give the same keys and values in
# any window. A KV snapshot's key holds these.
KV_FIELDS = ("rope_scaling_type", "rope_freq_base", "rope_freq_scale", "yarn_orig_ctx", "yarn_ext_factor",
             "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow", "flash_attn", "type_k", "type_v")

# How many layers to put on the GPU: a count, every layer, or None (all when a GPU is usable).
GpuLayers = Union[int, Literal["all"], None]


@dataclass(frozen=True)
class RuntimeParams:
    """Everything llama.cpp needs to run a model at an extended context, fully explicit:
    the values never depend on scaling metadata already present in the file."""

    preset: str
    method: str  # the method actually applied: none | extrapolate | linear | ntk | yarn
    n_ctx: int
    trained_ctx: int
    scale: float  # s = n_ctx / trained_ctx (1.0 when nothing is scaled)
    rope_scaling_type: str | None  # "none" | "linear" | "yarn"; None: whatever the file says
    rope_freq_base: float  # 0: whatever the file says
    rope_freq_scale: float  # 0: whatever the file says
    yarn_orig_ctx: int = 0
    yarn_ext_factor: float = -1.0
    yarn_attn_factor: float = -1.0
    yarn_beta_fast: float = -1.0
    yarn_beta_slow: float = -1.0
    flash_attn: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    n_batch: int = 512
    n_ubatch: int = 512
    notes: tuple[str, ...] = ()
    # Self-Extend (method "self-extend"): keys further back than the neighbour window sit at
    # grouped positions (index // group). 1 and 0: off.
    group_size: int = 1
    neighbor_window: int = 0
    # Sliding-window layers (Gemma 2/3 and others): False keeps their cache to the window (plus a
    # micro-batch), as llama.cpp's own tools do; True sizes it for the whole context, as
    # llama-cpp-python does by default. It changes memory, never results (see memory.py).
    swa_full: bool = False
    # Per-dimension-pair RoPE factors (a preset's [rope_freqs]; () none) and the attention factor
    # that goes with them. llama.cpp takes these only from a GGUF (the rope_freqs.weight tensor and
    # {arch}.rope.scaling.attn_factor), never from a context parameter: only `convert` can use them.
    rope_freqs: tuple[float, ...] = ()
    rope_attn_factor: float = 1.0

    @property
    def self_extend(self) -> bool:
        return self.group_size > 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        if not self.self_extend:
            # Fields added with Self-Extend appear only when it is on: every record, eval cache key and
            # summarizer fingerprint written before them stays the same.
            del data["group_size"], data["neighbor_window"]
        if not self.swa_full:  # likewise, and it does not change results
            del data["swa_full"]
        if not self.rope_freqs:  # likewise: every key written before [rope_freqs] stays the same
            del data["rope_freqs"], data["rope_attn_factor"]
        else:
            data["rope_freqs"] = list(self.rope_freqs)
        return data

    @property
    def scaling(self) -> str:
        """The scaling in words: 'unscaled', 'yarn s=2' or 'self-extend G=6 W=2048'."""
        if self.self_extend:
            return f"self-extend G={self.group_size} W={self.neighbor_window}"
        return "unscaled" if self.scale == 1.0 else f"{self.method} s={self.scale:g}"

    def with_ctx_settings(self, **changes: Any) -> RuntimeParams:
        return replace(self, **changes)

    def llama_flags(self) -> list[str]:
        """The equivalent llama-cli / llama-server command-line flags."""
        flags = ["-c", str(self.n_ctx)]
        if self.rope_scaling_type is not None:
            flags += ["--rope-scaling", self.rope_scaling_type]
        if self.rope_freq_base:
            flags += ["--rope-freq-base", _num(self.rope_freq_base)]
        if self.rope_scaling_type in ("linear", "yarn"):
            flags += ["--rope-scale", _num(1.0 / self.rope_freq_scale)]
        if self.rope_scaling_type == "yarn":
            flags += ["--yarn-orig-ctx", str(self.yarn_orig_ctx)]
            flags += ["--yarn-beta-fast", _num(self.yarn_beta_fast), "--yarn-beta-slow", _num(self.yarn_beta_slow)]
            if self.yarn_ext_factor >= 0:
                flags += ["--yarn-ext-factor", _num(self.yarn_ext_factor)]
            if self.yarn_attn_factor >= 0:
                flags += ["--yarn-attn-factor", _num(self.yarn_attn_factor)]
        flags += ["-fa", "on" if self.flash_attn else "off"]
        if self.type_k != "f16":
            flags += ["--cache-type-k", self.type_k]
        if self.type_v != "f16":
            flags += ["--cache-type-v", self.type_v]
        flags += ["-b", str(self.n_batch), "-ub", str(self.n_ubatch)]
        if self.swa_full:
            flags += ["--swa-full"]
        if self.self_extend:  # llama-cli / llama-completion only: llama-server dropped them (#9860)
            flags += ["--grp-attn-n", str(self.group_size), "--grp-attn-w", str(self.neighbor_window)]
        return flags


def result_params(params: RuntimeParams) -> dict[str, Any]:
    """The parameters a stored result depends on (an eval cell, a summary): `to_dict` without
    NON_RESULT_FIELDS, so a key written before a field was added stays the same."""
    return {k: v for k, v in params.to_dict().items() if k not in NON_RESULT_FIELDS}


def kv_params(params: RuntimeParams) -> tuple[tuple[str, Any], ...]:
    """(field, value) for each of KV_FIELDS: what a KV snapshot's key holds of `params`."""
    return tuple((name, getattr(params, name)) for name in KV_FIELDS)


def default_threads() -> int:
    """llama.cpp threads when none are given: every core this process may use (its affinity, which
    a container or `taskset` narrows, not the machine's count)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _num(value: float) -> str:
    return f"{value:.10g}"
