"""Small synthetic GGUF files written with the gguf package, for edge cases no real model covers.

`write_gguf` is the one place a test writes a GGUF: exactly the typed key-values and tensors it is
given. `write_model` builds a header-complete llama-style file on it; test_hostile_gguf.py and
gguf_runnable.py build their own key-values and tensors and write them with it too."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType as T, Keys


@dataclass(frozen=True)
class V:
    """One metadata value with its exact GGUF type (arrays also name their item type)."""

    type: T
    value: Any
    item: T | None = None


def write_gguf(path: Path, kvs: Mapping[str, V | None], tensors: Mapping[str, np.ndarray],
               arch: str = "llama", alignment: int | None = None) -> Path:
    """Write these key-values in this order (None: left out, e.g. the `general.architecture` the
    writer adds itself) and these tensors (aligned to `alignment`, written as general.alignment)."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, v in kvs.items():
        if v is None:
            w.kv_data[0].pop(key, None)
        else:
            w.add_key_value(key, v.value, v.type, sub_type=v.item)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_model(path: Path, arch: str = "llama", *, context: int = 4096, n_embd: int = 64, n_head: int = 4,
                n_head_kv: int | None = None, n_layer: int = 2, rope_base: float | None = 10000.0,
                scaling: tuple[str, float, int] | None = None, learned_positions: bool = False,
                alibi_bias: float | None = None, extra_kv: dict[str, object] | None = None,
                tensor_bytes: int = 0, extra_tensors: Mapping[str, np.ndarray] | None = None,
                alignment: int | None = None) -> Path:
    """A header-complete GGUF with tiny f32 tensors (not runnable by llama.cpp, enough for metadata)."""
    k = lambda template: template.format(arch=arch)  # noqa: E731
    kvs: dict[str, V | None] = {
        Keys.General.NAME: V(T.STRING, f"synthetic-{arch}"), k(Keys.LLM.CONTEXT_LENGTH): V(T.UINT32, context),
        k(Keys.LLM.EMBEDDING_LENGTH): V(T.UINT32, n_embd), k(Keys.LLM.BLOCK_COUNT): V(T.UINT32, n_layer),
        k(Keys.Attention.HEAD_COUNT): V(T.UINT32, n_head),
        k(Keys.Attention.HEAD_COUNT_KV): V(T.UINT32, n_head_kv or n_head),
        Keys.General.FILE_TYPE: V(T.UINT32, gguf.LlamaFileType.ALL_F32),
    }
    if rope_base is not None:
        kvs[k(Keys.Rope.FREQ_BASE)] = V(T.FLOAT32, rope_base)
        kvs[k(Keys.Rope.DIMENSION_COUNT)] = V(T.UINT32, n_embd // n_head)
    if scaling is not None:
        kind, factor, orig = scaling
        kvs[k(Keys.Rope.SCALING_TYPE)] = V(T.STRING, gguf.RopeScalingType(kind).value)
        kvs[k(Keys.Rope.SCALING_FACTOR)] = V(T.FLOAT32, factor)
        kvs[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] = V(T.UINT32, orig)
    if alibi_bias is not None:
        kvs[k(Keys.Attention.MAX_ALIBI_BIAS)] = V(T.FLOAT32, alibi_bias)
    for key, value in (extra_kv or {}).items():
        kvs[key] = (V(T.STRING, value) if isinstance(value, str) else V(T.FLOAT32, value) if isinstance(value, float)
                    else V(T.UINT32, int(value)))
    tensors = {"token_embd.weight": np.ones((32, n_embd), dtype=np.float32)}
    if learned_positions:
        tensors["position_embd.weight"] = np.ones((context, n_embd), dtype=np.float32)
    if tensor_bytes:
        tensors["blob.weight"] = np.zeros(tensor_bytes // 4, dtype=np.float32)
    tensors.update(extra_tensors or {})
    return write_gguf(path, kvs, tensors, arch, alignment)
