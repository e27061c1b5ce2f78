"""The bounded header reader and the facts it derives, on the real model and synthetic files."""
from __future__ import annotations

import struct

import pytest

from localctx.errors import ModelFileError
from localctx.gguf_meta import read_facts, read_header

from gguf_factory import write_model


def test_default_model_facts(facts):
    assert (facts.architecture, facts.positions, facts.quantization) == ("llama", "rope", "Q4_1")
    assert (facts.context_length, facts.trained_context, facts.rope_freq_base, facts.rope_dims) == (8192, 8192, 100000.0, 64)
    assert (facts.n_layers, facts.n_heads, facts.n_heads_kv, facts.head_dim_k) == (30, 9, 3, 64)
    assert facts.scaling is None and facts.provenance is None
    # 30 layers × 3 KV heads × (64 + 64) dims × 2 bytes
    assert facts.kv_cache_bytes(1, "f16") == 30 * 3 * 128 * 2
    assert facts.chat_template and "im_start" in facts.chat_template


def test_header_read_locates_tensor_data(model_path):
    header = read_header(model_path)
    assert header.data_offset % header.alignment == 0
    last = max(header.tensors, key=lambda t: t.offset)
    assert header.data_offset + last.offset + last.nbytes <= header.file_size


def test_synthetic_yarn_baked(tmp_path):
    facts = read_facts(write_model(tmp_path / "m.gguf", context=32768, scaling=("yarn", 4.0, 8192)))
    assert facts.scaling is not None and facts.scaling.type == "yarn" and facts.scaling.factor == 4.0
    assert facts.context_length == 32768 and facts.trained_context == 8192


def test_missing_file():
    with pytest.raises(ModelFileError, match="not found"):
        read_header("/nonexistent/model.gguf")


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_header(path)


def test_bad_version(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 99) + b"\0" * 32)
    with pytest.raises(ModelFileError, match="version 99"):
        read_header(path)


@pytest.mark.parametrize("keep", [30, 200, 1000])
def test_truncated_header(tmp_path, model_path, keep):
    path = tmp_path / "t.gguf"
    path.write_bytes(model_path.read_bytes()[:keep])
    with pytest.raises(ModelFileError, match="truncated|ends first"):
        read_header(path)


def test_truncated_tensor_data(tmp_path, model_path):
    data = model_path.read_bytes()
    path = tmp_path / "t.gguf"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        read_header(path)


def test_huge_array_length_fails_fast(tmp_path):
    # One KV claiming 2^60 strings: the gguf package's reader would try to loop over them.
    key = b"tokenizer.ggml.tokens"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + struct.pack("<I", 8) + struct.pack("<Q", 2**60)
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(ModelFileError, match="1,152,921,504,606,846,976 strings .* ends first"):
        read_header(path)  # refused by the bounds check before any loop or allocation


def test_huge_string_length_fails_fast(tmp_path):
    path = tmp_path / "s.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"abc")
    with pytest.raises(ModelFileError, match="ends first"):
        read_header(path)
