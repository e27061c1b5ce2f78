"""Small synthetic GGUF files written with the gguf package, for edge cases no real model covers."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_model(path: Path, arch: str = "llama", *, context: int = 4096, n_embd: int = 64, n_head: int = 4,
                n_head_kv: int | None = None, n_layer: int = 2, rope_base: float | None = 10000.0,
                scaling: tuple[str, float, int] | None = None, learned_positions: bool = False,
                alibi_bias: float | None = None, extra_kv: dict[str, object] | None = None,
                tensor_bytes: int = 0) -> Path:
    """A header-complete GGUF with tiny f32 tensors (not runnable by llama.cpp, enough for metadata)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"synthetic-{arch}")
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv or n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope_base is not None:
        w.add_rope_freq_base(rope_base)
        w.add_rope_dimension_count(n_embd // n_head)
    if scaling is not None:
        kind, factor, orig = scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
    if alibi_bias is not None:
        w.add_max_alibi_bias(alibi_bias)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))
    w.add_tensor("token_embd.weight", np.ones((32, n_embd), dtype=np.float32))
    if learned_positions:
        w.add_tensor("position_embd.weight", np.ones((context, n_embd), dtype=np.float32))
    if tensor_bytes:
        w.add_tensor("blob.weight", np.zeros(tensor_bytes // 4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
