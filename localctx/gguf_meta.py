"""Bounded GGUF header reading and the model facts derived from it.

The gguf package's reader trusts the lengths written in a file: a tiny file claiming a huge array
makes it allocate or loop for ever. This reader checks every length against the file size before
using it, so a malformed file is refused in well under a second, and it never touches tensor data
(inspecting a 70 GB model costs the same as a 100 MB one). The converter reuses the raw byte spans
it records, so untouched metadata is copied bit for bit.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, Keys

from .errors import ModelFileError
from .files import open_regular
from .params import KV_CACHE_TYPES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSOR_DIMS = 4
# Arrays longer than this keep only their count; nothing localctx reads from a header is that long.
MAX_DECODED_ARRAY = 64

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class KeyValue:
    key: str
    type: GGUFValueType
    value: Any  # scalars and strings decoded; arrays as a list when short, else None
    item_type: GGUFValueType | None  # arrays only
    count: int  # arrays only: element count
    span: tuple[int, int]  # raw bytes of the whole entry (key included) in the file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    kvs: dict[str, KeyValue]
    tensors: list[TensorInfo]
    tensor_info_span: tuple[int, int]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value


class _Cursor:
    """Reads little-endian GGUF values from a buffer, refusing any read past its end."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos:,} of {len(self.buf):,}). "
            "The file may be truncated or corrupt; download or convert it again."
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n:,} bytes but the file ends first")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, what)
        self.pos += length

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown value type {raw} for {what}") from None


def _read_kv(cur: _Cursor, index: int) -> KeyValue:
    start = cur.pos
    key = cur.string(f"metadata key #{index}")
    vtype = cur.value_type(f"type of {key!r}")
    if vtype == GGUFValueType.ARRAY:
        item_type = cur.value_type(f"array item type of {key!r}")
        count = cur.scalar("<Q", f"array length of {key!r}")
        items = _read_array(cur, key, item_type, count)
        return KeyValue(key, vtype, items, item_type, count, (start, cur.pos))
    value = _read_value(cur, key, vtype)
    return KeyValue(key, vtype, value, None, 0, (start, cur.pos))


def _read_value(cur: _Cursor, key: str, vtype: GGUFValueType) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype == GGUFValueType.ARRAY:
        raise cur.fail(f"nested array in {key!r}")
    return cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key!r}")


def _read_array(cur: _Cursor, key: str, item_type: GGUFValueType, count: int) -> list[Any] | None:
    if item_type == GGUFValueType.ARRAY:
        raise cur.fail(f"nested array in {key!r}")
    if item_type == GGUFValueType.STRING:
        # Each string needs at least its 8-byte length: reject absurd counts before looping.
        cur.need(count * 8, f"{count:,} strings of {key!r}")
        keep = count <= MAX_DECODED_ARRAY
        items = []
        for i in range(count):
            if keep:
                items.append(cur.string(f"item {i} of {key!r}"))
            else:
                cur.skip_string(f"item {i} of {key!r}")
        return items if keep else None
    fmt = _SCALAR_FORMATS[item_type]
    size = struct.calcsize(fmt)
    cur.need(count * size, f"{count:,} items of {key!r}")
    items = None
    if count <= MAX_DECODED_ARRAY:
        items = [v[0] for v in struct.iter_unpack(fmt, cur.buf[cur.pos : cur.pos + count * size])]
    cur.pos += count * size
    return items


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(f"name of tensor #{index}")
    n_dims = cur.scalar("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_TENSOR_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
    shape = tuple(cur.scalar("<Q", f"shape of tensor {name!r}") for _ in range(n_dims))
    ggml_type = cur.scalar("<I", f"type of tensor {name!r}")
    offset = cur.scalar("<Q", f"offset of tensor {name!r}")
    return name, shape, ggml_type, offset


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {ggml_type}") from None
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if shape[0] % block:
        raise cur.fail(f"tensor {name!r} row length {shape[0]} is not a multiple of its block size {block}")
    return n_elements // block * type_size


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and bounds-check a GGUF header. Raises ModelFileError with a clear reason."""
    path = Path(path)
    if not os.path.lexists(path):
        raise ModelFileError(f"Model file not found: {path}")
    # A FIFO or device is refused here, before anything blocks on it or maps it.
    with open_regular(path, ModelFileError, "model") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise ModelFileError(f"{path} is not a GGUF file: it is only {size} bytes long.")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(view, path, size)
            finally:
                view.release()


def _parse(view: memoryview, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(view, path)
    magic = bytes(view[:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
            "localctx reads GGUF models as used by llama.cpp; convert other formats with llama.cpp's "
            "convert_hf_to_gguf.py first."
        )
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (this looks like a big-endian GGUF, which is not supported)" if version > 0xFFFF else ""
        raise ModelFileError(f"{path}: unsupported GGUF version {version}{hint}; supported: 2 and 3.")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each key-value needs at least 12 bytes and each tensor info at least 28: cheap sanity bound.
    cur.need(n_kv * 12 + n_tensors * 28, f"{n_kv:,} metadata entries and {n_tensors:,} tensors")
    kvs: dict[str, KeyValue] = {}
    for i in range(n_kv):
        kv = _read_kv(cur, i)
        kvs[kv.key] = kv
    alignment = _alignment(cur, kvs)
    info_start = cur.pos
    raw_tensors = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    info_end = cur.pos
    data_offset = -(-info_end // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in raw_tensors:
        nbytes = _tensor_nbytes(cur, name, shape, ggml_type)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if data_offset + offset + nbytes > size:
            raise ModelFileError(
                f"{path} is truncated or corrupt: tensor {name!r} ends at byte "
                f"{data_offset + offset + nbytes:,} but the file has only {size:,} bytes."
            )
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    return GGUFHeader(path, version, kvs, tensors, (info_start, info_end), alignment, data_offset, size)


def _alignment(cur: _Cursor, kvs: dict[str, KeyValue]) -> int:
    kv = kvs.get(Keys.General.ALIGNMENT)
    if kv is None:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    if not isinstance(kv.value, int) or kv.value <= 0 or kv.value & (kv.value - 1):
        raise cur.fail(f"{Keys.General.ALIGNMENT} must be a power of two, not {kv.value!r}")
    return kv.value


# --- Model facts -----------------------------------------------------------------------------

# Provenance written by `localctx convert`; our own names, defined once here.
PROVENANCE_PREFIX = "general.localctx."
PROV_TOOL = PROVENANCE_PREFIX + "tool"
PROV_VERSION = PROVENANCE_PREFIX + "version"
PROV_PRESET = PROVENANCE_PREFIX + "preset"
PROV_METHOD = PROVENANCE_PREFIX + "method"
PROV_SOURCE = PROVENANCE_PREFIX + "source_file"
PROV_ORIG_CTX = PROVENANCE_PREFIX + "original.context_length"
PROV_ORIG_BASE = PROVENANCE_PREFIX + "original.rope.freq_base"
PROV_ORIG_SCALING = PROVENANCE_PREFIX + "original.rope.scaling"  # "type:factor:orig_ctx" or "none"

ALIBI_ARCHS = frozenset({"bloom", "mpt", "jais", "refact"})
NO_POSITION_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv7", "rwkv6qwen2", "rwkv7qwen"})
POS_EMBD_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "linear" | "yarn" | "longrope" | ...
    factor: float
    original_context: int


@dataclass(frozen=True)
class Provenance:
    tool: str
    version: str
    preset: str
    method: str
    source_file: str
    original_context: int
    original_freq_base: float | None
    original_scaling: str


@dataclass(frozen=True)
class ModelFacts:
    """What localctx needs to know about a model, read from its GGUF header alone."""

    path: Path
    file_size: int
    architecture: str
    name: str
    quantization: str
    positions: str  # "rope" | "alibi" | "learned" | "none"
    context_length: int  # as written in the file ({arch}.context_length)
    rope_freq_base: float | None
    rope_dims: int | None
    scaling: RopeScaling | None  # RoPE scaling already in the file
    n_layers: int
    n_heads: int
    n_heads_kv: int
    head_dim_k: int
    head_dim_v: int
    n_embd: int
    n_vocab: int
    provenance: Provenance | None = None
    chat_template: str | None = field(default=None, repr=False)

    @property
    def trained_context(self) -> int:
        """The context the weights were trained on: scaling already in the file is not counted,
        so a converted model resolves relative to its original window and is never scaled twice."""
        if self.provenance is not None:
            return self.provenance.original_context
        if self.scaling is not None and self.scaling.original_context > 0:
            return self.scaling.original_context
        return self.context_length

    @property
    def trained_freq_base(self) -> float | None:
        if self.provenance is not None and self.provenance.original_freq_base:
            return self.provenance.original_freq_base
        return self.rope_freq_base

    def kv_cache_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str | None = None) -> int:
        """The KV cache llama.cpp allocates for `n_ctx` tokens: K and V for every layer."""
        per_k = self.n_heads_kv * self.head_dim_k * KV_CACHE_TYPES[type_k]
        per_v = self.n_heads_kv * self.head_dim_v * KV_CACHE_TYPES[type_v or type_k]
        return int(self.n_layers * (per_k + per_v) * n_ctx)


def arch_key(template: str, arch: str) -> str:
    """A per-architecture GGUF key from its `gguf.Keys` template, e.g. llama.context_length."""
    return template.format(arch=arch)


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        values = [v for v in value if isinstance(v, int)]
        return max(values) if values else None
    return value if isinstance(value, int) else None


def facts_from_header(header: GGUFHeader) -> ModelFacts:
    get = header.get
    arch = get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{header.path} has no {Keys.General.ARCHITECTURE}; it is not a model GGUF.")

    def akey(template: str) -> Any:
        return get(arch_key(template, arch))

    n_embd = _first_int(akey(Keys.LLM.EMBEDDING_LENGTH)) or 0
    n_heads = _first_int(akey(Keys.Attention.HEAD_COUNT)) or 0
    n_heads_kv = _first_int(akey(Keys.Attention.HEAD_COUNT_KV)) or n_heads
    head_dim = n_embd // n_heads if n_heads else 0
    head_dim_k = _first_int(akey(Keys.Attention.KEY_LENGTH)) or head_dim
    head_dim_v = _first_int(akey(Keys.Attention.VALUE_LENGTH)) or head_dim
    positions = _positions(header, arch)
    rope_base = akey(Keys.Rope.FREQ_BASE)
    if positions == "rope" and rope_base is None:
        rope_base = 10000.0  # llama.cpp's default when the key is absent
    rope_dims = _first_int(akey(Keys.Rope.DIMENSION_COUNT)) or (head_dim_k if positions == "rope" else None)
    tokens_kv = header.kvs.get(Keys.Tokenizer.LIST)
    return ModelFacts(
        path=header.path,
        file_size=header.file_size,
        architecture=arch,
        name=str(get(Keys.General.NAME) or header.path.stem),
        quantization=_quantization(header),
        positions=positions,
        context_length=_first_int(akey(Keys.LLM.CONTEXT_LENGTH)) or 0,
        rope_freq_base=float(rope_base) if rope_base is not None else None,
        rope_dims=rope_dims if positions == "rope" else None,
        scaling=_scaling(header, arch),
        n_layers=_first_int(akey(Keys.LLM.BLOCK_COUNT)) or 0,
        n_heads=n_heads,
        n_heads_kv=n_heads_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_embd=n_embd,
        n_vocab=tokens_kv.count if tokens_kv else 0,
        provenance=_provenance(header),
        chat_template=get(Keys.Tokenizer.CHAT_TEMPLATE),
    )


def _positions(header: GGUFHeader, arch: str) -> str:
    if any(t.name == POS_EMBD_TENSOR for t in header.tensors):
        return "learned"
    if arch in ALIBI_ARCHS or arch_key(Keys.Attention.MAX_ALIBI_BIAS, arch) in header.kvs:
        return "alibi"
    if arch in NO_POSITION_ARCHS:
        return "none"
    return "rope"


def _quantization(header: GGUFHeader) -> str:
    file_type = header.get(Keys.General.FILE_TYPE)
    if isinstance(file_type, int):
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file type {file_type}"
    types = {t.ggml_type for t in header.tensors}
    names = sorted(gguf.GGMLQuantizationType(t).name for t in types if t in gguf.GGMLQuantizationType._value2member_map_)
    return "/".join(names) or "unknown"


def _scaling(header: GGUFHeader, arch: str) -> RopeScaling | None:
    kind = header.get(arch_key(Keys.Rope.SCALING_TYPE, arch))
    factor = header.get(arch_key(Keys.Rope.SCALING_FACTOR, arch))
    if kind is None and factor is not None:
        kind = "linear"  # llama.cpp's default scaling type when only a factor is given
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    orig = header.get(arch_key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch))
    return RopeScaling(str(kind), float(factor), int(orig) if isinstance(orig, int) else 0)


def _provenance(header: GGUFHeader) -> Provenance | None:
    if PROV_TOOL not in header.kvs:
        return None
    get = header.get
    return Provenance(
        tool=str(get(PROV_TOOL)),
        version=str(get(PROV_VERSION, "")),
        preset=str(get(PROV_PRESET, "")),
        method=str(get(PROV_METHOD, "")),
        source_file=str(get(PROV_SOURCE, "")),
        original_context=int(get(PROV_ORIG_CTX, 0)),
        original_freq_base=float(get(PROV_ORIG_BASE)) if get(PROV_ORIG_BASE) is not None else None,
        original_scaling=str(get(PROV_ORIG_SCALING, "none")),
    )


def read_facts(path: str | os.PathLike[str]) -> ModelFacts:
    return facts_from_header(read_header(path))
