"""Tiny GGUF models that llama.cpp really loads and runs, for tests that need a live context of an
architecture the default model (SmolLM2, plain llama) does not have: sliding-window memory
estimates against what llama.cpp actually allocates (gemma3), and Self-Extend refusals on memory
that cannot shift positions (qwen2vl, whose M-RoPE positions llama.cpp cannot re-rotate; also
gemma3 with a window-sized SWA cache). `llama` is the full-attention control, `mamba` a recurrent
model without a KV cache. Note that llama.cpp 0.3.36 reports a recurrent memory as shiftable
(llama_memory_recurrent::get_can_shift returns true), so mamba does not trigger the refusal.

Unlike gguf_factory.write_model (header only), every tensor the llama.cpp loader of
llama-cpp-python 0.3.36 requires is written, with small random weights, and the tokenizer is the
default model's, so prompts tokenize exactly as they do for SmolLM2. The output is noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType as T

from gguf_factory import V, write_gguf
from localctx.paths import default_model_path

ARCHITECTURES: tuple[str, ...] = ("gemma3", "llama", "mamba", "qwen2vl")

# llama.cpp's gemma3 loader falls back to this pattern when the GGUF has no
# `gemma3.attention.sliding_window_pattern` (src/models/gemma3.cpp: load_swa_pattern(ml, 6)).
GEMMA3_DEFAULT_SWA_PATTERN = 6

# Small enough that activations stay tame in f16 through the layers, large enough that the logits
# differ (std about 0.16), so sampling is not a tie between 49152 equal tokens.
_WEIGHT_STD = 0.02
_RMS_EPS = 1e-6

# Mamba hyper-parameters llama.cpp requires; it only supports d_inner = 2 * n_embd.
_MAMBA_D_CONV = 4
_MAMBA_D_STATE = 16

_TOKENIZER_GGML_PREFIX = gguf.Keys.Tokenizer.MODEL.rpartition(".")[0] + "."


def gemma3_swa_layers(n_layer: int, swa_pattern: int | Sequence[bool] | None = None) -> list[bool]:
    """Which layers llama.cpp treats as sliding-window for a gemma3 file written here (mirrors
    llama_hparams::set_swa_pattern with dense_first=false): with pattern n, layer il slides unless
    il % n == n - 1; n == 0 makes every layer slide, n == 1 none. A bool sequence is taken as is.
    For the defaults (6 layers, no key written, so n = 6): layers 0-4 slide, layer 5 is global."""
    if swa_pattern is not None and not isinstance(swa_pattern, int):
        return [bool(b) for b in swa_pattern]
    n = GEMMA3_DEFAULT_SWA_PATTERN if swa_pattern is None else swa_pattern
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]


def write_runnable_model(path: Path, arch: str = "gemma3", *, n_layer: int = 6, n_embd: int = 64,
                         n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, context: int = 2048,
                         sliding_window: int = 128, swa_pattern: int | Sequence[bool] | None = None,
                         seed: int = 0) -> Path:
    """Write a tiny GGUF of `arch` (one of ARCHITECTURES) that llama.cpp loads and runs.

    gemma3: every layer has q/k norms and post-attention/post-FFN norms; `sliding_window` is
        written as `gemma3.attention.sliding_window`. With `swa_pattern=None` no pattern key is
        written and llama.cpp applies its built-in pattern 6: for the default 6 layers, layers 0-4
        use sliding-window attention over `sliding_window` tokens and layer 5 attends globally
        (see gemma3_swa_layers). An int or a per-layer bool sequence is written as
        `gemma3.attention.sliding_window_pattern`, which overrides the built-in pattern.
        `sliding_window=0` gives a gemma3 without SWA (every layer global).
        What llama.cpp 0.3.36 then allocates (measured): a non-SWA cache of n_ctx cells for the
        global layers, and an SWA cache of PAD256(min(n_ctx, sliding_window + n_ubatch)) cells
        with `swa_full=False` (768 at the defaults and n_ubatch 512, for n_ctx 1024 and 4096
        alike; llama_memory_can_shift is then False because the two sizes differ), or n_ctx
        cells with `swa_full=True`, llama-cpp-python's default (can_shift True).
    llama: full attention in every layer (sliding_window is ignored).
    qwen2vl: llama-shaped text layers with M-RoPE (`qwen2vl.rope.dimension_sections`); llama.cpp
        cannot shift M-RoPE positions, so llama_memory_can_shift is False at any n_ctx.
    mamba: recurrent (Mamba-1), no attention and no KV cache; n_head, n_head_kv, n_ff and
        sliding_window are ignored; d_inner = 2 * n_embd. Its memory still reports can_shift True.

    Weights are N(0, 0.02) from `seed` (norm weights are 1); token_embd is f16 and doubles as the
    output projection, the rest is f32. About 9 MB at n_embd=64 (6.3 MB embedding, 2.6 MB of
    tokenizer metadata).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; expected one of {ARCHITECTURES}")
    if swa_pattern is not None and arch != "gemma3":
        raise ValueError("swa_pattern only applies to gemma3")
    if arch == "gemma3" and sliding_window > 0:
        if isinstance(swa_pattern, Sequence) and len(swa_pattern) != n_layer:
            raise ValueError(f"swa_pattern has {len(swa_pattern)} entries for {n_layer} layers")
        # A sliding window with no sliding layer makes llama.cpp GGML_ASSERT(is_swa_any()) while
        # creating the context, which aborts the whole process instead of raising.
        if not any(gemma3_swa_layers(n_layer, swa_pattern)):
            raise ValueError("this swa_pattern leaves no sliding layer; llama.cpp would abort")
    if arch != "mamba" and (n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2):
        raise ValueError("n_embd must divide by n_head into an even head size, and n_head by n_head_kv")

    rng = np.random.default_rng(seed)
    tokenizer = _tokenizer_metadata()
    n_vocab = len(tokenizer[gguf.Keys.Tokenizer.LIST][0])

    k = lambda template: template.format(arch=arch)  # noqa: E731
    kvs: dict[str, V | None] = {
        gguf.Keys.General.NAME: V(T.STRING, f"runnable-{arch}"),
        # Mostly by bytes: the f16 embedding dwarfs the f32 layers.
        gguf.Keys.General.FILE_TYPE: V(T.UINT32, gguf.LlamaFileType.MOSTLY_F16),
        k(gguf.Keys.LLM.CONTEXT_LENGTH): V(T.UINT32, context), k(gguf.Keys.LLM.EMBEDDING_LENGTH): V(T.UINT32, n_embd),
        k(gguf.Keys.LLM.BLOCK_COUNT): V(T.UINT32, n_layer),
        k(gguf.Keys.Attention.LAYERNORM_RMS_EPS): V(T.FLOAT32, _RMS_EPS),
        k(gguf.Keys.LLM.VOCAB_SIZE): V(T.UINT32, n_vocab),
        **{key: V(vtype, value, sub_type) for key, (value, vtype, sub_type) in tokenizer.items()},
    }

    tensors: dict[str, np.ndarray] = {}

    # No output.weight: every architecture here falls back to the tied embedding, which keeps the
    # file at one vocab-sized matrix.
    tensors[_name(gguf.MODEL_TENSOR.TOKEN_EMBD)] = _rand(rng, n_vocab, n_embd).astype(np.float16)
    tensors[_name(gguf.MODEL_TENSOR.OUTPUT_NORM)] = _ones(n_embd)

    if arch == "mamba":
        _mamba_hparams_and_tensors(kvs, k, tensors, rng, n_layer, n_embd)
    else:
        head_dim = n_embd // n_head
        kvs.update({
            k(gguf.Keys.LLM.FEED_FORWARD_LENGTH): V(T.UINT32, n_ff),
            k(gguf.Keys.Attention.HEAD_COUNT): V(T.UINT32, n_head),
            k(gguf.Keys.Attention.HEAD_COUNT_KV): V(T.UINT32, n_head_kv),
            k(gguf.Keys.Attention.KEY_LENGTH): V(T.UINT32, head_dim),
            k(gguf.Keys.Attention.VALUE_LENGTH): V(T.UINT32, head_dim),
            k(gguf.Keys.Rope.DIMENSION_COUNT): V(T.UINT32, head_dim),
        })
        if arch == "gemma3":
            # Gemma 3's real bases: 1e6 for global layers, 1e4 for sliding ones (the loader reads
            # the latter only when sliding_window is set).
            kvs[k(gguf.Keys.Rope.FREQ_BASE)] = V(T.FLOAT32, 1_000_000.0)
            kvs[k(gguf.Keys.Rope.FREQ_BASE_SWA)] = V(T.FLOAT32, 10_000.0)
            kvs[k(gguf.Keys.Attention.SLIDING_WINDOW)] = V(T.UINT32, sliding_window)
            if swa_pattern is not None:
                kvs[k(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)] = (
                    V(T.UINT32, swa_pattern) if isinstance(swa_pattern, int) else V(T.ARRAY, list(swa_pattern)))
        elif arch == "qwen2vl":
            kvs[k(gguf.Keys.Rope.FREQ_BASE)] = V(T.FLOAT32, 1_000_000.0)
            kvs[k(gguf.Keys.Rope.DIMENSION_SECTIONS)] = V(T.ARRAY, _mrope_sections(head_dim))
        else:
            kvs[k(gguf.Keys.Rope.FREQ_BASE)] = V(T.FLOAT32, 10_000.0)
        for i in range(n_layer):
            tensors[_name(gguf.MODEL_TENSOR.ATTN_NORM, i)] = _ones(n_embd)
            tensors[_name(gguf.MODEL_TENSOR.ATTN_Q, i)] = _rand(rng, n_head * head_dim, n_embd)
            tensors[_name(gguf.MODEL_TENSOR.ATTN_K, i)] = _rand(rng, n_head_kv * head_dim, n_embd)
            tensors[_name(gguf.MODEL_TENSOR.ATTN_V, i)] = _rand(rng, n_head_kv * head_dim, n_embd)
            tensors[_name(gguf.MODEL_TENSOR.ATTN_OUT, i)] = _rand(rng, n_embd, n_head * head_dim)
            tensors[_name(gguf.MODEL_TENSOR.FFN_NORM, i)] = _ones(n_embd)
            tensors[_name(gguf.MODEL_TENSOR.FFN_GATE, i)] = _rand(rng, n_ff, n_embd)
            tensors[_name(gguf.MODEL_TENSOR.FFN_UP, i)] = _rand(rng, n_ff, n_embd)
            tensors[_name(gguf.MODEL_TENSOR.FFN_DOWN, i)] = _rand(rng, n_embd, n_ff)
            if arch == "gemma3":
                # Required (not optional) by llama.cpp's gemma3 loader.
                tensors[_name(gguf.MODEL_TENSOR.ATTN_Q_NORM, i)] = _ones(head_dim)
                tensors[_name(gguf.MODEL_TENSOR.ATTN_K_NORM, i)] = _ones(head_dim)
                tensors[_name(gguf.MODEL_TENSOR.ATTN_POST_NORM, i)] = _ones(n_embd)
                tensors[_name(gguf.MODEL_TENSOR.FFN_POST_NORM, i)] = _ones(n_embd)

    return write_gguf(path, kvs, tensors, arch)


def _mamba_hparams_and_tensors(kvs: dict[str, V | None], k: Callable[[str], str], tensors: dict[str, np.ndarray],
                               rng: np.random.Generator, n_layer: int, n_embd: int) -> None:
    d_inner = 2 * n_embd
    dt_rank = -(-n_embd // 16)  # ceil(n_embd / 16), as in the reference Mamba configs
    kvs.update({
        k(gguf.Keys.SSM.CONV_KERNEL): V(T.UINT32, _MAMBA_D_CONV), k(gguf.Keys.SSM.INNER_SIZE): V(T.UINT32, d_inner),
        k(gguf.Keys.SSM.STATE_SIZE): V(T.UINT32, _MAMBA_D_STATE), k(gguf.Keys.SSM.TIME_STEP_RANK): V(T.UINT32, dt_rank),
        # Zero (unused) attention sizes, as convert_hf_to_gguf writes for Mamba, so header readers
        # see "no attention" rather than a missing key.
        k(gguf.Keys.Attention.HEAD_COUNT): V(T.UINT32, 0), k(gguf.Keys.Attention.HEAD_COUNT_KV): V(T.UINT32, 0),
        k(gguf.Keys.LLM.FEED_FORWARD_LENGTH): V(T.UINT32, 0),
    })
    # A must be negative, as in real checkpoints (the converter stores -exp(A_log)): the scan
    # multiplies the state by exp(dt * A) each token, which a positive A would make grow.
    a = -np.tile(np.arange(1, _MAMBA_D_STATE + 1, dtype=np.float32), (d_inner, 1))
    for i in range(n_layer):
        tensors[_name(gguf.MODEL_TENSOR.ATTN_NORM, i)] = _ones(n_embd)
        tensors[_name(gguf.MODEL_TENSOR.SSM_IN, i)] = _rand(rng, 2 * d_inner, n_embd)
        tensors[_name(gguf.MODEL_TENSOR.SSM_CONV1D, i)] = _rand(rng, d_inner, _MAMBA_D_CONV)
        tensors[_name(gguf.MODEL_TENSOR.SSM_CONV1D, i, "bias")] = _rand(rng, d_inner)
        tensors[_name(gguf.MODEL_TENSOR.SSM_X, i)] = _rand(rng, dt_rank + 2 * _MAMBA_D_STATE, d_inner)
        tensors[_name(gguf.MODEL_TENSOR.SSM_DT, i)] = _rand(rng, d_inner, dt_rank)
        tensors[_name(gguf.MODEL_TENSOR.SSM_DT, i, "bias")] = _rand(rng, d_inner)
        # llama.cpp names these two without a ".weight" suffix.
        tensors[_name(gguf.MODEL_TENSOR.SSM_A, i, None)] = a.copy()
        tensors[_name(gguf.MODEL_TENSOR.SSM_D, i, None)] = _ones(d_inner)
        tensors[_name(gguf.MODEL_TENSOR.SSM_OUT, i)] = _rand(rng, n_embd, d_inner)


def _mrope_sections(head_dim: int) -> list[int]:
    # Qwen2-VL splits its 64 rotary pairs 16/24/24 (time/height/width); the same proportions over
    # head_dim / 2 pairs. Only text is fed here, where all three get the same position anyway.
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return [t, h, pairs - t - h, 0]


def _name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str | None = "weight") -> str:
    base = gguf.TENSOR_NAMES[tensor].format(bid=bid)
    return base if suffix is None else f"{base}.{suffix}"


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # numpy shapes are ggml's ne reversed: ggml {n_embd, n_vocab} is numpy (n_vocab, n_embd).
    return (rng.standard_normal(shape) * _WEIGHT_STD).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


@lru_cache(maxsize=1)
def _tokenizer_metadata() -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The default model's tokenizer keys (all tokenizer.ggml.* and the chat template) as
    (value, type, array item type), read once per process: parsing ~100k strings is the slow part
    of writing a model."""
    reader = gguf.GGUFReader(default_model_path())
    metadata: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]] = {}
    for key, field in reader.fields.items():
        if not (key.startswith(_TOKENIZER_GGML_PREFIX) or key == gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        vtype = field.types[0]
        # Keep the stored item type (token_type is int32) rather than letting the writer infer it.
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        metadata[key] = (field.contents(), vtype, sub_type)
    return metadata
