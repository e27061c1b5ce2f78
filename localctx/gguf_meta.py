"""Bounded GGUF header reading and the model facts derived from it.

The gguf package's reader trusts the lengths written in a file: a tiny file claiming a huge array
makes it allocate or loop for ever. This reader checks every length against the file size before
using it, so a malformed file is refused in well under a second, and it never touches tensor data
(inspecting a 70 GB model costs the same as a 100 MB one). The converter reuses the raw byte spans
it records, so untouched metadata is copied bit for bit.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Callable
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
U32_MAX = 2**32 - 1
# llama.cpp keeps RoPE bases and factors as C floats: a larger value would become inf there.
FLOAT32_MAX = 3.4028234663852886e38
# Limits of the llama.cpp build localctx runs on. Past them llama.cpp aborts while loading
# (GGML_ASSERT: exit 134 and no message), so the header check refuses them first.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# The RoPE scaling types llama.cpp knows; any other name in a file aborts it.
ROPE_SCALING_TYPES = tuple(t.value for t in gguf.RopeScalingType)
# Arrays longer than this keep only their count; the longest localctx reads are per-layer values.
MAX_DECODED_ARRAY = LLAMA_MAX_LAYERS

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
_INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
_NUMBER_TYPES = _INT_TYPES | {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


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
    if kv.type not in _INT_TYPES or kv.value <= 0 or kv.value & (kv.value - 1):
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
# Written only when a conversion changed the per-dimension RoPE factors (rope_freqs.weight) or the
# attention factor: the original factors (a float32 array, empty when there was no tensor) and the
# original attention factor (absent when the file had none).
PROV_ORIG_ROPE_FREQS = PROVENANCE_PREFIX + "original.rope_freqs"
PROV_ORIG_ATTN_FACTOR = PROVENANCE_PREFIX + "original.rope.attn_factor"

ALIBI_ARCHS = frozenset({"bloom", "mpt", "jais", "refact"})
NO_POSITION_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv7", "rwkv6qwen2", "rwkv7qwen"})
# Architectures whose rotary dimensions llama.cpp requires to equal the head size.
FULL_ROTARY_ARCHS = frozenset({"llama", "deci", "falcon", "llama-embed"})
POS_EMBD_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"


@dataclass(frozen=True)
class SlidingRule:
    """How llama.cpp lays out an architecture's sliding-window layers when the GGUF does not list
    them: `pattern` n makes every n-th layer global (the last of each n, or the first with
    `dense_first`); 0 makes every layer slide. Some architectures have a default window, or a
    window llama.cpp imposes whatever the file says."""

    pattern: int
    dense_first: bool = False
    default_window: int = 0
    forced_window: int = 0
    kind: str = "standard"  # standard | chunked (llama4) | symmetric (encoders)


_ARCH = gguf.MODEL_ARCH_NAMES
# From llama.cpp's per-architecture loaders (src/models/<arch>.cpp, load_arch_hparams). An
# architecture not listed is sized as full attention on every layer: an upper bound, never below.
SLIDING_RULES: dict[str, SlidingRule] = {
    _ARCH[gguf.MODEL_ARCH.GEMMA2]: SlidingRule(2, default_window=4096),
    _ARCH[gguf.MODEL_ARCH.GEMMA3]: SlidingRule(6),
    _ARCH[gguf.MODEL_ARCH.GEMMA3N]: SlidingRule(5),
    _ARCH[gguf.MODEL_ARCH.GEMMA_EMBEDDING]: SlidingRule(6, kind="symmetric"),
    _ARCH[gguf.MODEL_ARCH.COHERE2]: SlidingRule(4),
    _ARCH[gguf.MODEL_ARCH.LLAMA4]: SlidingRule(4, forced_window=8192, kind="chunked"),
    _ARCH[gguf.MODEL_ARCH.GPT_OSS]: SlidingRule(2),
    _ARCH[gguf.MODEL_ARCH.OLMO2]: SlidingRule(4),
    _ARCH[gguf.MODEL_ARCH.PLAMO3]: SlidingRule(8),
    _ARCH[gguf.MODEL_ARCH.SMALLTHINKER]: SlidingRule(4, dense_first=True, forced_window=4096),
    _ARCH[gguf.MODEL_ARCH.EXAONE_MOE]: SlidingRule(4, default_window=128),
}


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
    baked_freqs: bool = False  # the conversion wrote per-dimension factors (PROV_ORIG_ROPE_FREQS)


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
    n_ff: int = 0  # the widest feed-forward layer (sizes llama.cpp's compute buffer)
    # KV heads of each layer (a layer may have none, or fewer than n_heads_kv); () means n_heads_kv each.
    kv_heads_per_layer: tuple[int, ...] = ()
    # Sliding-window attention: the window in tokens (0: none) and which layers use it.
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    sliding_kind: str = ""

    @property
    def n_sliding_layers(self) -> int:
        return sum(self.sliding_layers)

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

    def kv_cache_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str | None = None, *,
                       sliding_cells: int | None = None) -> int:
        """The KV cache llama.cpp allocates for `n_ctx` cells: K and V for every layer that has
        them; the sliding-window layers hold `sliding_cells` cells (default: `n_ctx`, the
        full-size cache)."""
        full, sliding = self.kv_bytes_per_cell(type_k, type_v)
        return int(full * n_ctx + sliding * (n_ctx if sliding_cells is None else sliding_cells))

    def kv_bytes_per_cell(self, type_k: str = "f16", type_v: str | None = None) -> tuple[float, float]:
        """Bytes one cached token takes in (global layers, sliding-window layers)."""
        heads = self.kv_heads_per_layer or (self.n_heads_kv,) * self.n_layers
        per_head = self.head_dim_k * KV_CACHE_TYPES[type_k] + self.head_dim_v * KV_CACHE_TYPES[type_v or type_k]
        sliding = self.sliding_layers or (False,) * self.n_layers
        full = sum(h for h, s in zip(heads, sliding) if not s) * per_head
        return full, sum(h for h, s in zip(heads, sliding) if s) * per_head


def arch_key(template: str, arch: str) -> str:
    """A per-architecture GGUF key from its `gguf.Keys` template, e.g. llama.context_length."""
    return template.format(arch=arch)


# --- Metadata validation ---------------------------------------------------------------------


class _Fields:
    """The one gate for the metadata values localctx uses: typed, range-checked getters. A bad
    value is refused here, naming the file, the key, the value and what is allowed, so neither a
    Python traceback nor a llama.cpp assertion is ever what the user sees."""

    def __init__(self, header: GGUFHeader) -> None:
        self.header = header

    def refuse(self, key: str, problem: str) -> ModelFileError:
        return ModelFileError(
            f"{self.header.path}: metadata {key} {problem}. The file is damaged or was written by a faulty "
            "tool: download or convert it again (localctx refuses it rather than let llama.cpp crash on it)."
        )

    def invalid(self, key: str, kv: KeyValue, rule: str) -> ModelFileError:
        return self.refuse(key, f"= {_shown(kv)} is invalid: {rule}")

    def _get(self, key: str, required: bool) -> KeyValue | None:
        kv = self.header.kvs.get(key)
        if kv is None and required:
            raise self.refuse(key, "is missing (llama.cpp requires it)")
        return kv

    def integer(self, key: str, lo: int, hi: int, default: int | None = None, *, required: bool = False,
                why: str = "") -> int | None:
        kv = self._get(key, required)
        if kv is None:
            return default
        rule = f"it must be an integer from {lo:,} to {hi:,}{why}"
        if kv.type not in _INT_TYPES or not lo <= kv.value <= hi:
            raise self.invalid(key, kv, rule)
        return int(kv.value)

    def per_layer(self, key: str, lo: int, hi: int, n_layers: int, *, why: str = "") -> list[int] | None:
        """A count given once for all layers or as an array of one per layer (llama.cpp takes both)."""
        kv = self._get(key, False)
        if kv is None:
            return None
        if kv.type != GGUFValueType.ARRAY:
            value = self.integer(key, lo, hi, why=why)
            return [value] * n_layers if value is not None else None
        rule = f"it must be one integer from {lo:,} to {hi:,}{why}, or an array of {n_layers} of them (one per layer)"
        if kv.item_type not in _INT_TYPES or kv.count != n_layers or kv.value is None:
            raise self.invalid(key, kv, rule)
        bad = [v for v in kv.value if not lo <= v <= hi]
        if bad:
            raise self.refuse(key, f"holds {bad[0]} (an array item), which is invalid: {rule}")
        return [int(v) for v in kv.value]

    def number(self, key: str, default: float | None = None) -> float | None:
        """A finite number above 0: llama.cpp divides by RoPE factors and raises bases to powers."""
        kv = self._get(key, False)
        if kv is None:
            return default
        value = float(kv.value) if kv.type in _NUMBER_TYPES else math.nan
        if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX):
            raise self.invalid(key, kv, f"it must be a finite number above 0 (at most {FLOAT32_MAX:.4g})")
        return value

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        kv = self._get(key, False)
        if kv is None:
            return default
        if kv.type != GGUFValueType.STRING or (choices and kv.value not in choices):
            raise self.invalid(key, kv, f"it must be one of {', '.join(choices)}" if choices else "it must be a string")
        return str(kv.value)

    def array_count(self, key: str) -> int:
        kv = self._get(key, False)
        if kv is None:
            return 0
        if kv.type != GGUFValueType.ARRAY:
            raise self.invalid(key, kv, "it must be an array")
        return kv.count


def _shown(kv: KeyValue) -> str:
    if kv.type == GGUFValueType.ARRAY:
        return f"an array of {kv.count:,} {getattr(kv.item_type, 'name', '').lower()} values"
    if kv.type == GGUFValueType.STRING:
        text = kv.value if len(kv.value) <= 60 else kv.value[:57] + "..."
        return f"{text!r} (a string)"
    if kv.type == GGUFValueType.BOOL:
        return f"{kv.value} (a bool)"
    return repr(kv.value)


_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


def facts_from_header(header: GGUFHeader) -> ModelFacts:
    """The model facts, every value validated (see _Fields): a file that would make llama.cpp
    assert, or localctx compute nonsense, is refused with the key named."""
    f = _Fields(header)
    arch = f.string(Keys.General.ARCHITECTURE)
    if not arch:
        raise ModelFileError(f"{header.path} has no {Keys.General.ARCHITECTURE}; it is not a model GGUF.")

    def k(template: str) -> str:
        return arch_key(template, arch)

    n_layers = _layer_count(f, k(Keys.LLM.BLOCK_COUNT))
    _check_llama_limits(f, k, n_layers)
    positions = _positions(header, arch)
    n_embd = f.integer(k(Keys.LLM.EMBEDDING_LENGTH), 1, U32_MAX, required=True)
    assert n_embd is not None
    n_heads, kv_heads, head_dim_k, head_dim_v = _attention(f, k, n_layers, n_embd, positions)
    rope_base, rope_dims = _rope(f, arch, positions, head_dim_k)
    window, sliding, kind = _sliding(f, k, arch, n_layers)
    n_ff = f.per_layer(k(Keys.LLM.FEED_FORWARD_LENGTH), 0, U32_MAX, n_layers)
    return ModelFacts(
        path=header.path,
        file_size=header.file_size,
        architecture=arch,
        name=f.string(Keys.General.NAME) or header.path.stem,
        quantization=_quantization(header, f.integer(Keys.General.FILE_TYPE, 0, U32_MAX)),
        positions=positions,
        context_length=f.integer(k(Keys.LLM.CONTEXT_LENGTH), 0, U32_MAX, 0) or 0,
        rope_freq_base=rope_base,
        rope_dims=rope_dims,
        scaling=_scaling(f, k),
        n_layers=n_layers,
        n_heads=n_heads,
        n_heads_kv=max(kv_heads),
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_embd=n_embd,
        n_vocab=f.array_count(Keys.Tokenizer.LIST),
        provenance=_provenance(f),
        chat_template=f.string(Keys.Tokenizer.CHAT_TEMPLATE),
        n_ff=max(n_ff or [0]),
        kv_heads_per_layer=tuple(kv_heads),
        sliding_window=window,
        sliding_layers=sliding,
        sliding_kind=kind,
    )


def _sliding(f: _Fields, k: Callable[[str], str], arch: str, n_layers: int) -> tuple[int, tuple[bool, ...], str]:
    """The sliding window and which layers use it, as llama.cpp's loader decides (SLIDING_RULES)."""
    rule = SLIDING_RULES.get(arch)
    if rule is None:
        return 0, (), ""
    window_key, pattern_key = k(Keys.Attention.SLIDING_WINDOW), k(Keys.Attention.SLIDING_WINDOW_PATTERN)
    window = f.integer(window_key, 0, U32_MAX, rule.default_window) or 0
    if not window:  # llama.cpp turns sliding off when the window is absent or 0
        return 0, (), ""
    window = rule.forced_window or window
    kv = f.header.kvs.get(pattern_key)
    if kv is not None and kv.type == GGUFValueType.ARRAY:
        if kv.value is None or kv.count != n_layers or kv.item_type not in (*_INT_TYPES, GGUFValueType.BOOL):
            raise f.invalid(pattern_key, kv, f"it must be one flag per layer ({n_layers})")
        layers = tuple(bool(v) for v in kv.value)
    else:
        n = f.integer(pattern_key, 0, U32_MAX, rule.pattern) or 0
        layers = tuple(n == 0 or (il % n != 0 if rule.dense_first else il % n < n - 1) for il in range(n_layers))
    if not any(layers):
        # llama.cpp builds a sliding-window cache with no layer in it and aborts the process.
        raise f.refuse(pattern_key, f"leaves no layer sliding while {window_key} = {window:,}: llama.cpp crashes on "
                                    "such a file (set the window to 0 for a model without sliding layers)")
    return window, layers, rule.kind


def _layer_count(f: _Fields, key: str) -> int:
    """{arch}.block_count, which llama.cpp sizes its per-layer arrays by: in its range, and equal
    to the number of blk.N tensor groups when the file has any (a synthetic header may have none)."""
    n_layers = f.integer(key, 1, LLAMA_MAX_LAYERS, required=True, why=" (llama.cpp's layer limit)")
    assert n_layers is not None
    indices = [int(m.group(1)) for t in f.header.tensors if (m := _BLOCK_TENSOR.match(t.name))]
    if indices and max(indices) + 1 != n_layers:
        raise f.refuse(key, f"= {n_layers} does not match the tensors: they hold layers blk.0 to "
                            f"blk.{max(indices)} ({max(indices) + 1} layers)")
    return n_layers


def _check_llama_limits(f: _Fields, k: Callable[[str], str], n_layers: int) -> None:
    """Values localctx does not use but llama.cpp asserts on while loading any model."""
    experts = f.integer(k(Keys.LLM.EXPERT_COUNT), 0, LLAMA_MAX_EXPERTS, 0, why=" (llama.cpp's expert limit)") or 0
    used_key = k(Keys.LLM.EXPERT_USED_COUNT)
    used = f.per_layer(used_key, 0, experts, n_layers, why=f" (at most {k(Keys.LLM.EXPERT_COUNT)})") or [0]
    if experts and not max(used):
        raise f.refuse(used_key, f"is 0 or missing, but {k(Keys.LLM.EXPERT_COUNT)} = {experts}: a mixture of "
                                 "experts must route each token to at least one")
    groups = f.integer(k(Keys.LLM.EXPERT_GROUP_COUNT), 0, max(experts - 1, 0), 0,
                       why=f" (below {k(Keys.LLM.EXPERT_COUNT)})") or 0
    if groups > 1:
        if experts % groups:
            raise f.refuse(k(Keys.LLM.EXPERT_GROUP_COUNT), f"= {groups} does not divide "
                                                           f"{k(Keys.LLM.EXPERT_COUNT)} = {experts}")
        f.integer(k(Keys.LLM.EXPERT_GROUP_USED_COUNT), 1, groups - 1, required=True)
    f.integer(k(Keys.LLM.NEXTN_PREDICT_LAYERS), 0, n_layers, why=f" (at most {k(Keys.LLM.BLOCK_COUNT)})")


def _attention(f: _Fields, k: Callable[[str], str], n_layers: int, n_embd: int,
               positions: str) -> tuple[int, list[int], int, int]:
    """Head count, KV heads of each layer, and head sizes: they size the KV cache and the rotary
    dimensions."""
    heads_key, kv_key = k(Keys.Attention.HEAD_COUNT), k(Keys.Attention.HEAD_COUNT_KV)
    heads = f.per_layer(heads_key, 0, U32_MAX, n_layers) or [0] * n_layers
    kv_heads = f.per_layer(kv_key, 0, U32_MAX, n_layers) or heads
    for h, kv in zip(heads, kv_heads):
        # Grouped-query attention shares each KV head among a whole number of query heads.
        if kv and h % kv:
            raise f.refuse(kv_key, f"= {kv} does not divide {heads_key} = {h}: each KV head must serve a whole "
                                   "number of attention heads")
    n_heads, n_heads_kv = max(heads), max(kv_heads)
    if positions != "none" and not (n_heads and n_heads_kv):
        key = heads_key if not n_heads else kv_key
        raise f.refuse(key, f"is 0 or missing, but a {positions} attention model needs at least one head")
    head_dim_k = f.integer(k(Keys.Attention.KEY_LENGTH), 1, U32_MAX)
    head_dim_v = f.integer(k(Keys.Attention.VALUE_LENGTH), 1, U32_MAX)
    derived = 0
    if n_heads and (head_dim_k is None or head_dim_v is None):
        if n_embd % n_heads:
            raise f.refuse(k(Keys.LLM.EMBEDDING_LENGTH), f"= {n_embd} is not a multiple of {heads_key} = "
                                                          f"{n_heads}, so the head size is undefined")
        derived = n_embd // n_heads
    return n_heads, kv_heads, head_dim_k or derived, head_dim_v or derived


def _rope(f: _Fields, arch: str, positions: str, head_dim_k: int) -> tuple[float | None, int | None]:
    base = f.number(arch_key(Keys.Rope.FREQ_BASE, arch))
    dims_key = arch_key(Keys.Rope.DIMENSION_COUNT, arch)
    dims = f.integer(dims_key, 0, U32_MAX)
    if positions != "rope":
        return base, None
    if dims is None:
        dims = head_dim_k  # llama.cpp's default: rotate the whole head
    if dims < 2 or dims % 2 or dims > head_dim_k:
        source = "" if dims_key in f.header.kvs else " (absent: the head size)"
        raise f.refuse(dims_key, f"= {dims}{source} is invalid: rotary dimensions turn in pairs, so it must be an "
                                 f"even number from 2 to the head size {head_dim_k}")
    if arch in FULL_ROTARY_ARCHS and dims != head_dim_k:
        raise f.refuse(dims_key, f"= {dims} is invalid: {arch} rotates whole heads, so llama.cpp requires it to equal "
                                 f"the head size {head_dim_k}")
    return (10000.0 if base is None else base), dims  # 10000: llama.cpp's default base


def _positions(header: GGUFHeader, arch: str) -> str:
    if any(t.name == POS_EMBD_TENSOR for t in header.tensors):
        return "learned"
    if arch in ALIBI_ARCHS or arch_key(Keys.Attention.MAX_ALIBI_BIAS, arch) in header.kvs:
        return "alibi"
    if arch in NO_POSITION_ARCHS:
        return "none"
    return "rope"


def _quantization(header: GGUFHeader, file_type: int | None) -> str:
    if file_type is not None:
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file type {file_type}"
    types = {t.ggml_type for t in header.tensors}
    names = sorted(gguf.GGMLQuantizationType(t).name for t in types if t in gguf.GGMLQuantizationType._value2member_map_)
    return "/".join(names) or "unknown"


def _scaling(f: _Fields, k: Callable[[str], str]) -> RopeScaling | None:
    kind = f.string(k(Keys.Rope.SCALING_TYPE), choices=ROPE_SCALING_TYPES)
    factor = f.number(k(Keys.Rope.SCALING_FACTOR))
    orig = f.integer(k(Keys.Rope.SCALING_ORIG_CTX_LEN), 0, U32_MAX, 0) or 0
    if kind is None and factor is not None:
        kind = "linear"  # llama.cpp's default scaling type when only a factor is given
    if kind in (None, "none") or factor is None or factor == 1.0:
        return None
    return RopeScaling(kind, factor, orig)


def _provenance(f: _Fields) -> Provenance | None:
    if PROV_TOOL not in f.header.kvs:
        return None
    original_scaling = f.string(PROV_ORIG_SCALING, "none") or "none"
    _check_scaling_text(f, original_scaling)
    return Provenance(
        tool=f.string(PROV_TOOL) or "",
        version=f.string(PROV_VERSION, "") or "",
        preset=f.string(PROV_PRESET, "") or "",
        method=f.string(PROV_METHOD, "") or "",
        source_file=f.string(PROV_SOURCE, "") or "",
        original_context=f.integer(PROV_ORIG_CTX, 1, U32_MAX, required=True) or 0,
        original_freq_base=f.number(PROV_ORIG_BASE),
        original_scaling=original_scaling,
        baked_freqs=PROV_ORIG_ROPE_FREQS in f.header.kvs,
    )


def _check_scaling_text(f: _Fields, text: str) -> None:
    """The original scaling as `localctx convert` records it: "none" or "type:factor:original_context"."""
    if text == "none":
        return
    parts = text.split(":")
    try:
        ok = (len(parts) == 3 and parts[0] in ROPE_SCALING_TYPES and math.isfinite(float(parts[1]))
              and float(parts[1]) > 0 and 0 <= int(parts[2]) <= U32_MAX)
    except ValueError:
        ok = False
    if not ok:
        raise f.refuse(PROV_ORIG_SCALING, f"= {text[:60]!r} is invalid: it must be 'none' or "
                                          "'type:factor:original_context', e.g. 'yarn:4.0:8192'")


def read_facts(path: str | os.PathLike[str]) -> ModelFacts:
    return facts_from_header(read_header(path))
