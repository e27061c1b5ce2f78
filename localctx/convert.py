"""Bake a resolved preset into a new GGUF: plan the metadata change, stream an atomic copy, verify.

The output differs from the input only in a handful of metadata entries and, for per-dimension
RoPE factors (a [rope_freqs] preset, or YaRN with tuned betas or factors), in one small tensor,
rope_freqs.weight, added at the end of the data, replaced in place, or removed. Every other
key-value is copied as its raw bytes, every other tensor-info entry is kept as it was, and the
tensor data is streamed byte for byte in bounded pieces (tensor offsets are relative to the data
section, so they stay valid once the data section starts on an aligned boundary again). The new
file appears under its final name only after it is complete and fsynced, so an interrupted run
never leaves a partial OUT.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import secrets
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

from gguf import GGMLQuantizationType, GGUFValueType, Keys

from .errors import ConversionError
from .gguf_meta import (
    _SCALAR_FORMATS,
    PROV_METHOD,
    PROV_ORIG_ATTN_FACTOR,
    PROV_ORIG_BASE,
    PROV_ORIG_CTX,
    PROV_ORIG_ROPE_FREQS,
    PROV_ORIG_SCALING,
    PROV_PRESET,
    PROV_SOURCE,
    PROV_TOOL,
    PROV_VERSION,
    PROVENANCE_PREFIX,
    GGUFHeader,
    ModelFacts,
    RopeScaling,
    TensorInfo,
    arch_key,
    facts_from_header,
    read_header,
)
from .fsutil import fsync_dir, name_max, probe_writable
from .memory import human
from .paths import resolve_model_path
from .params import RuntimeParams
from .presets import YARN_BETA_FAST, YARN_BETA_SLOW, Ladder, file_params, load_preset, resolve
from . import rope_freqs
from .version import __version__

# The context the file said before any conversion, when it differs from the trained context (a model
# shipped with its own scaling): `native` needs it to restore the file exactly.
PROV_ORIG_FILE_CTX = PROVENANCE_PREFIX + "original.file_context_length"
TOOL_NAME = "localctx"
TEMP_MARKER = ".localctx-tmp-"
COPY_CHUNK = 64 * 2**20  # bytes per in-kernel copy step (copy_file_range: no user-space buffer)
BUFFER_CHUNK = 8 * 2**20  # the one buffer of the fallback copy (across filesystems): bounds peak RSS
SPACE_MARGIN = 16 * 2**20
DEFAULT_TOLERANCE = 1e-3
# A bake of tuned YaRN into rope_freqs passes --verify when its logits differ from the preset's by at
# most this many times what a one-step (float32) change of the frequency scale does to them. Measured
# in docs/convert.md: the bake differs by 0.8-1.1x that noise floor on the Q4_1 default model and 2.0x
# on an F32 copy of it, where a YaRN with other betas differs by 33-43x.
NOISE_MULTIPLE = 4.0
VERIFY_EXTRA_TOKENS = 256  # how far past the trained context --verify runs

_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


# --- Planning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str
    old: Any  # None: the key is absent from the input
    new: Any  # None: the key is removed

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class Original:
    """The metadata the model had before localctx ever converted it."""

    trained_context: int
    file_context: int
    freq_base: float | None
    scaling: str  # "type:factor:orig_ctx" or "none" (the PROV_ORIG_SCALING format)
    rope_freqs: tuple[float, ...] | None = None  # its rope_freqs.weight (None: it had none)
    attn_factor: float | None = None  # its {arch}.rope.scaling.attn_factor (None: absent)


@dataclass(frozen=True)
class TensorEdit:
    """The one tensor a conversion may change: rope_freqs.weight, float32 values."""

    name: str
    old: tuple[float, ...] | None  # in IN (None: absent, so the tensor is added at the end)
    new: tuple[float, ...] | None  # None: removed
    info: TensorInfo | None  # IN's entry, when it has the tensor

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "old": _listed(self.old), "new": _listed(self.new)}


def _listed(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


@dataclass(frozen=True)
class Plan:
    source: Path
    header: GGUFHeader
    facts: ModelFacts
    params: RuntimeParams
    updates: dict[str, tuple[GGUFValueType, Any] | None]  # key → (type, value), or None to remove
    changes: tuple[Change, ...]
    tensor: TensorEdit | None = None
    notes: tuple[str, ...] = ()
    baked_yarn: bool = False  # tuned YaRN written as rope_freqs: --verify measures a noise floor

    @property
    def data_bytes(self) -> int:
        return self.header.file_size - self.header.data_offset


def scaling_string(scaling: RopeScaling | None) -> str:
    return "none" if scaling is None else f"{scaling.type}:{scaling.factor!r}:{scaling.original_context}"


def parse_scaling(text: str) -> RopeScaling | None:
    if not text or text == "none":
        return None
    try:
        kind, factor, orig = text.split(":")
        return RopeScaling(kind, float(factor), int(orig))
    except ValueError:
        raise ConversionError(f"Unreadable provenance {PROV_ORIG_SCALING} = {text!r}; "
                              "convert the original file instead.") from None


def original_of(header: GGUFHeader, facts: ModelFacts) -> Original:
    """The pre-conversion metadata: from provenance when localctx wrote this file, else the file."""
    p = facts.provenance
    freqs, attn = _original_freqs(header, facts)
    if p is None:
        return Original(facts.trained_context, facts.context_length, facts.rope_freq_base,
                        scaling_string(facts.scaling), freqs, attn)
    file_ctx = header.get(PROV_ORIG_FILE_CTX)
    return Original(p.original_context, int(file_ctx) if isinstance(file_ctx, int) else p.original_context,
                    p.original_freq_base, p.original_scaling, freqs, attn)


def _original_freqs(header: GGUFHeader, facts: ModelFacts) -> tuple[tuple[float, ...] | None, float | None]:
    """The original rope_freqs.weight and attention factor: recorded in provenance when a conversion
    changed them, else what the file holds now."""
    attn_key = arch_key(Keys.Rope.SCALING_ATTN_FACTOR, facts.architecture)
    pairs = _pairs(facts)
    if PROV_ORIG_ROPE_FREQS not in header.kvs:
        return rope_freqs.read_factors(header, pairs), _positive_float(header, attn_key)
    kv = header.kvs[PROV_ORIG_ROPE_FREQS]
    if (kv.type != GGUFValueType.ARRAY or kv.item_type != GGUFValueType.FLOAT32 or kv.value is None
            or (kv.value and len(kv.value) != pairs)):
        raise ConversionError(f"Unreadable provenance {PROV_ORIG_ROPE_FREQS} in {header.path}; convert the "
                              "original file instead.")
    return (tuple(kv.value) or None), _positive_float(header, PROV_ORIG_ATTN_FACTOR)


def _positive_float(header: GGUFHeader, key: str) -> float | None:
    kv = header.kvs.get(key)
    if kv is None:
        return None
    if kv.type not in _FLOAT_TYPES or not (math.isfinite(kv.value) and kv.value > 0):
        raise ConversionError(f"{header.path}: {key} = {kv.value!r} is not a positive number; the file is damaged: "
                              "download or convert it again.")
    return float(kv.value)


def _target_rope_state(facts: ModelFacts, params: RuntimeParams, header: GGUFHeader, baked: bool) -> dict[str, Any]:
    """The RoPE keys (arch-qualified) as the preset needs them; None means absent. `baked`: YaRN
    goes into rope_freqs.weight, so the file says no scaling at all."""
    arch = facts.architecture
    kt, kf, ko = (arch_key(t, arch) for t in (Keys.Rope.SCALING_TYPE, Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ORIG_CTX_LEN))
    state: dict[str, Any] = {arch_key(Keys.Rope.FREQ_BASE, arch): params.rope_freq_base}
    if params.rope_scaling_type in ("linear", "yarn") and not baked:
        state[kt] = params.rope_scaling_type
        state[kf] = params.scale
        # llama.cpp takes YaRN's original context from this key, else from context_length (wrong here).
        state[ko] = params.yarn_orig_ctx if params.rope_scaling_type == "yarn" else None
    else:
        # An explicit "none" neutralises a type key left by the model or an earlier conversion, and
        # says plainly that a baked YaRN is not scaling the runtime should apply again.
        state[kt] = "none" if kt in header.kvs or baked else None
        state[kf] = None
        state[ko] = None
    return state


def _restored_state(facts: ModelFacts, orig: Original) -> dict[str, Any]:
    arch = facts.architecture
    state: dict[str, Any] = {arch_key(Keys.LLM.CONTEXT_LENGTH, arch): orig.file_context}
    if facts.positions == "rope":
        scaling = parse_scaling(orig.scaling)
        state[arch_key(Keys.Rope.FREQ_BASE, arch)] = orig.freq_base
        state[arch_key(Keys.Rope.SCALING_TYPE, arch)] = scaling.type if scaling else None
        state[arch_key(Keys.Rope.SCALING_FACTOR, arch)] = scaling.factor if scaling else None
        state[arch_key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = (scaling.original_context or None) if scaling else None
    return state


def _provenance_state(header: GGUFHeader, facts: ModelFacts, params: RuntimeParams, orig: Original) -> dict[str, Any]:
    source = facts.provenance.source_file if facts.provenance else facts.path.name
    state: dict[str, Any] = {
        PROV_TOOL: TOOL_NAME, PROV_VERSION: __version__, PROV_PRESET: params.preset, PROV_METHOD: params.method,
        PROV_SOURCE: source, PROV_ORIG_CTX: orig.trained_context, PROV_ORIG_BASE: orig.freq_base,
        PROV_ORIG_SCALING: orig.scaling,
        PROV_ORIG_FILE_CTX: orig.file_context if orig.file_context != orig.trained_context else None,
    }
    return state


def yarn_overrides(params: RuntimeParams) -> list[str]:
    """YaRN settings a preset tunes away from llama.cpp's defaults. The standard keys cannot carry
    them, and the llama architecture's loader ignores the `rope.scaling.yarn_*` keys (only grok and
    mistral3 read them), so such a preset is baked as per-dimension factors (rope_freqs)."""
    if params.rope_scaling_type != "yarn":
        return []
    odd = []
    if params.yarn_beta_fast not in (-1.0, YARN_BETA_FAST):
        odd.append(f"beta_fast={params.yarn_beta_fast:g}")
    if params.yarn_beta_slow not in (-1.0, YARN_BETA_SLOW):
        odd.append(f"beta_slow={params.yarn_beta_slow:g}")
    if params.yarn_ext_factor >= 0:
        odd.append(f"ext_factor={params.yarn_ext_factor:g}")
    if params.yarn_attn_factor >= 0:
        odd.append(f"attn_factor={params.yarn_attn_factor:g}")
    return odd


def plan_conversion(source: str | os.PathLike[str], preset: str, ctx: int | None = None) -> Plan:
    """Read IN's header (bounded, refuses malformed files), resolve the preset relative to the
    model's original context, and work out every metadata change. Touches nothing on disk."""
    header = read_header(resolve_model_path(source))
    facts = facts_from_header(header)
    params = resolve(load_preset(preset), facts, ctx=ctx)
    if params.self_extend:
        raise ConversionError(
            f"Preset {params.preset!r} is Self-Extend, a procedure localctx's engine runs while it evaluates (it "
            "moves older tokens to grouped positions in the KV cache), not metadata a GGUF can carry. Run the "
            f"model with --preset {preset} instead; nothing was written."
        )
    tuned = yarn_overrides(params)
    if tuned:
        rope_freqs.check_arch(facts.architecture, f"Preset {params.preset!r} tunes YaRN ({', '.join(tuned)}), which",
                              "Run it with --preset instead (`localctx presets show` prints its llama.cpp flags), "
                              "or convert with a preset of default [yarn] values.")
    if params.rope_freqs:
        rope_freqs.check_arch(facts.architecture, f"Preset {params.preset!r} sets per-dimension factors, which",
                              "This model cannot use such a preset.")
    orig = original_of(header, facts)
    arch = facts.architecture
    if params.method == "none" and not params.rope_freqs:
        # Restore the model exactly as it was before localctx touched it; provenance goes too.
        target = _restored_state(facts, orig)
        target.update({key: None for key in header.kvs if key.startswith(PROVENANCE_PREFIX)})
    else:
        target = {arch_key(Keys.LLM.CONTEXT_LENGTH, arch): params.n_ctx}
        if facts.positions == "rope":
            target.update(_target_rope_state(facts, params, header, baked=bool(tuned)))
        target.update(_provenance_state(header, facts, params, orig))
    freqs, attn, notes = _target_freqs(facts, params, orig, bool(tuned))
    target.update(_freqs_state(facts, orig, freqs, attn))
    base_key = arch_key(Keys.Rope.FREQ_BASE, arch)
    if base_key not in header.kvs and target.get(base_key) == facts.rope_freq_base:
        target.pop(base_key)  # absent means llama.cpp's default, which is already the value wanted
    updates, changes = _diff(header, target)
    tensor = _tensor_edit(header, facts, freqs)
    return Plan(header.path, header, facts, params, updates, tuple(changes), tensor, tuple(notes), bool(tuned))


def _target_freqs(facts: ModelFacts, params: RuntimeParams, orig: Original,
                  tuned: bool) -> tuple[tuple[float, ...] | None, float | None, list[str]]:
    """The rope_freqs.weight values and attention factor the output needs (float32), and notes for
    the plan. Factors are relative to the original model: a file's own factors (Llama 3.1's) are
    multiplied by the preset's, as llama.cpp composes YaRN with them at run time."""
    if params.rope_freqs:
        new, attn = params.rope_freqs, params.rope_attn_factor
    elif tuned:
        new, attn = rope_freqs.yarn_factors(params, facts.rope_dims or 0), rope_freqs.yarn_attention(params)
    else:
        return orig.rope_freqs, orig.attn_factor, []
    notes = []
    if tuned and rope_freqs.attn_factor_ignored(params):
        notes.append(f"llama.cpp ignores YaRN's attn_factor while ext_factor is not 0 (it uses 1 + 0.1·ln s, "
                     f"here {attn:.6g}); the file reproduces what llama.cpp runs")
    own = orig.rope_freqs
    if own is not None:  # as long as `new`: read_factors checked it against the rotary pairs
        notes.append(f"{facts.path.name} has its own {rope_freqs.ROPE_FREQS_TENSOR} (per-dimension factors, as Llama "
                     "3.1's): the new factors multiply them, as llama.cpp applies both at run time")
        new = tuple(a * b for a, b in zip(own, new))
    combined = (orig.attn_factor or 1.0) * attn
    # A factor of 1 on a file without the key leaves the key out, as the file had it.
    return rope_freqs.as_float32(new), (None if orig.attn_factor is None and combined == 1.0 else combined), notes


def _freqs_state(facts: ModelFacts, orig: Original, freqs: tuple[float, ...] | None,
                 attn: float | None) -> dict[str, Any]:
    """The attention-factor key, and provenance of the original factors when they change."""
    changed = (freqs, _f32(attn)) != (orig.rope_freqs, _f32(orig.attn_factor))
    return {
        arch_key(Keys.Rope.SCALING_ATTN_FACTOR, facts.architecture): attn,
        PROV_ORIG_ROPE_FREQS: list(orig.rope_freqs or ()) if changed else None,
        PROV_ORIG_ATTN_FACTOR: orig.attn_factor if changed else None,
    }


def _f32(value: float | None) -> float | None:
    return None if value is None else struct.unpack("<f", struct.pack("<f", value))[0]


def _tensor_edit(header: GGUFHeader, facts: ModelFacts, freqs: tuple[float, ...] | None) -> TensorEdit | None:
    """How rope_freqs.weight must change from IN to hold `freqs` (None: nothing to do). Both have
    one factor per rotary pair, so a replacement fits the old tensor's place exactly."""
    current = rope_freqs.read_factors(header, _pairs(facts))
    if current == freqs:
        return None
    return TensorEdit(rope_freqs.ROPE_FREQS_TENSOR, current, freqs, rope_freqs.find_tensor(header))


def _pairs(facts: ModelFacts) -> int | None:
    """Rotary pairs, the length llama.cpp requires of rope_freqs.weight (None: not a RoPE model)."""
    return facts.rope_dims // 2 if facts.positions == "rope" and facts.rope_dims else None


def _diff(header: GGUFHeader, target: dict[str, Any]) -> tuple[dict[str, tuple[GGUFValueType, Any] | None], list[Change]]:
    updates: dict[str, tuple[GGUFValueType, Any] | None] = {}
    changes: list[Change] = []
    for key, new in target.items():
        kv = header.kvs.get(key)
        if new is None:
            if kv is not None:
                updates[key] = None
                changes.append(Change(key, kv.value, None))
            continue
        vtype = _value_type(key, kv.type if kv else None, new)
        stored = _as_stored(vtype, new, key)
        if kv is not None and kv.value == stored:
            continue
        updates[key] = (vtype, stored)
        changes.append(Change(key, kv.value if kv else None, stored))
    return updates, changes


def _value_type(key: str, existing: GGUFValueType | None, value: Any) -> GGUFValueType:
    """An existing key keeps its GGUF type; a new one gets the type gguf-py's writer would use.
    Lists are float32 arrays (the only array the converter writes: PROV_ORIG_ROPE_FREQS)."""
    if isinstance(value, list):
        if existing not in (None, GGUFValueType.ARRAY):
            raise ConversionError(f"{key} is a {existing.name} in this file, not an array; convert the original file.")
        return GGUFValueType.ARRAY
    if existing is not None:
        if existing == GGUFValueType.ARRAY:
            raise ConversionError(f"{key} is an array in this file; the converter only rewrites scalar keys.")
        return existing
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, float):
        return GGUFValueType.FLOAT64 if key == PROV_ORIG_BASE else GGUFValueType.FLOAT32
    return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.UINT64


def _as_stored(vtype: GGUFValueType, value: Any, key: str) -> Any:
    """The value as it reads back from the file (float32 rounding included), so diffs are honest."""
    if vtype == GGUFValueType.ARRAY:
        return list(rope_freqs.as_float32(tuple(value)))
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise ConversionError(f"{key} holds a string in this file, cannot store {value!r} in it.")
        return value
    if isinstance(value, str):
        raise ConversionError(f"{key} holds a {vtype.name} in this file, cannot store {value!r} in it.")
    if vtype in _INT_TYPES:
        if float(value) != int(value):
            raise ConversionError(f"{key} holds an integer ({vtype.name}) in this file, cannot store {value!r}.")
        value = int(value)
    elif vtype in _FLOAT_TYPES:
        value = float(value)
    fmt = _SCALAR_FORMATS[vtype]
    try:
        return struct.unpack(fmt, struct.pack(fmt, value))[0]
    except (struct.error, OverflowError):
        raise ConversionError(f"{value!r} does not fit {key} ({vtype.name}).") from None


# --- Encoding ----------------------------------------------------------------------------------


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, vtype: GGUFValueType, value: Any) -> bytes:
    """One GGUF key-value entry (scalars, strings, float32 arrays) as it is laid out in a file."""
    head = _encode_string(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return head + _encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        return head + struct.pack("<IQ", int(GGUFValueType.FLOAT32), len(value)) + rope_freqs.to_bytes(tuple(value))
    return head + struct.pack(_SCALAR_FORMATS[vtype], value)


def build_header(plan: Plan, raw: bytes) -> bytes:
    """Everything before the data section of the new file: magic, version, counts, key-values
    (untouched ones as their raw bytes, in their original order), tensor infos, alignment padding.
    `raw` is the input's bytes from 0 to the end of its tensor-info block."""
    h = plan.header
    entries: list[bytes] = []
    for key, kv in h.kvs.items():
        if key in plan.updates:
            update = plan.updates[key]
            if update is not None:
                entries.append(encode_kv(key, *update))
        else:
            start, end = kv.span
            entries.append(raw[start:end])
    entries += [encode_kv(key, *u) for key, u in plan.updates.items() if key not in h.kvs and u is not None]
    infos, n_tensors = tensor_infos(plan, raw)
    out = bytearray(raw[:8])  # magic and version, as they were
    out += struct.pack("<QQ", n_tensors, len(entries))
    for entry in entries:
        out += entry
    out += infos
    out += b"\0" * (-len(out) % h.alignment)
    return bytes(out)


# The output's data section, in order: (offset in IN's data section, length) to copy, or bytes.
Piece = Union[tuple[int, int], bytes]


def tensor_infos(plan: Plan, raw: bytes) -> tuple[bytes, int]:
    """The output's tensor-info block and tensor count: IN's entries as their raw bytes, with the
    rope_freqs.weight entry appended or dropped (replaced in place, it keeps its entry)."""
    h, edit = plan.header, plan.tensor
    start, end = h.tensor_info_span
    block = raw[start:end]
    if edit is None or (edit.old is not None and edit.new is not None):
        return block, len(h.tensors)
    if edit.new is not None:
        return block + _encode_tensor_info(edit.name, len(edit.new), _appended_offset(plan)), len(h.tensors) + 1
    assert edit.info is not None
    first, last = _info_span(h, edit.info, raw)
    return block[: first - start] + block[last - start:], len(h.tensors) - 1


def _encode_tensor_info(name: str, n: int, offset: int) -> bytes:
    # name, one dimension of n, F32, offset in the data section (the GGUF tensor-info layout)
    return _encode_string(name) + struct.pack("<IQIQ", 1, n, int(GGMLQuantizationType.F32), offset)


def _info_span(h: GGUFHeader, info: TensorInfo, raw: bytes) -> tuple[int, int]:
    """Where `info`'s entry lies in the tensor-info block: entries are laid out in order, each its
    name, dimension count, dimensions, type and offset."""
    pos = h.tensor_info_span[0]
    for t in h.tensors:
        (name_len,) = struct.unpack_from("<Q", raw, pos)
        size = 8 + name_len + 4 + 8 * len(t.shape) + 4 + 8
        if t is info:
            return pos, pos + size
        pos += size
    raise ConversionError(f"{info.name} is not among the tensors of {h.path}.")  # unreachable: info is one of them


def _appended_offset(plan: Plan) -> int:
    return -(-plan.data_bytes // plan.header.alignment) * plan.header.alignment


def data_pieces(plan: Plan) -> list[Piece]:
    """The output's data section: IN's data streamed unchanged around the one tensor edit. An
    added tensor goes after everything, aligned and padded as gguf writers pad each tensor; a
    removed one that ends the data is cut off (one followed by others stays, unreferenced)."""
    n, edit = plan.data_bytes, plan.tensor
    if edit is None:
        return [(0, n)]
    align = plan.header.alignment
    if edit.new is None:
        assert edit.info is not None
        last = all(t.offset <= edit.info.offset for t in plan.header.tensors)
        return [(0, edit.info.offset if last else n)]
    data = rope_freqs.to_bytes(edit.new)
    if edit.info is None:
        start = _appended_offset(plan)
        return [(0, n), b"\0" * (start - n) + data + b"\0" * (-len(data) % align)]
    at, size = edit.info.offset, edit.info.nbytes
    return [(0, at), data, (at + size, n - at - size)]


def pieces_bytes(pieces: list[Piece]) -> int:
    return sum(p[1] if isinstance(p, tuple) else len(p) for p in pieces)


# --- Writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteStats:
    bytes: int
    seconds: float


def check_output(source: Path, out: Path, force: bool, *, probe: bool = True) -> None:
    """Refuse OUT before any work when it is IN (same path, symlink or hard link), a directory,
    exists without --force, has a name the filesystem cannot hold, or lies in a directory that
    cannot be written (`probe`: create and remove a file there; access() alone says yes to root
    even on a read-only filesystem)."""
    src = os.stat(source)
    try:
        dst = os.stat(out)  # follows a symlink: OUT pointing at IN is IN
    except FileNotFoundError:
        dst = None
    except OSError as exc:
        raise ConversionError(f"Cannot use {out} as output: {exc.strerror}.") from None
    if dst is not None and (dst.st_dev, dst.st_ino) == (src.st_dev, src.st_ino):
        raise ConversionError(
            f"{out} is the input file itself (same path, symlink or hard link). localctx never rewrites "
            "a model in place: give a new output path."
        )
    if out.is_dir():
        raise ConversionError(f"{out} is a directory; give the output file's path, e.g. {out / source.name}.")
    if not out.parent.is_dir():
        raise ConversionError(f"The output directory {out.parent} does not exist; create it first.")
    limit = name_max(out.parent)
    if len(os.fsencode(out.name)) > limit:
        raise ConversionError(f"The output name {out.name[:40]}… is {len(os.fsencode(out.name))} bytes long; "
                              f"the filesystem of {out.parent} allows at most {limit}. Choose a shorter name.")
    if os.path.lexists(out) and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it.")
    if probe:
        _probe_writable(out)


def _probe_writable(out: Path) -> None:
    try:  # named as OUT's temp files are, so a probe a killed run left is swept with them
        probe_writable(out.parent, prefix=f"{temp_prefix(out)}{os.getpid()}-")
    except OSError as exc:
        raise ConversionError(f"Cannot write the output in {out.parent}: {exc.strerror or exc}. "
                              "Choose a directory you can write to.") from None


def temp_prefix(out: Path) -> str:
    """The name prefix of OUT's temp files. A name too long to take the suffix (pid and random
    part) is replaced by its hash, so every OUT the filesystem can hold can be converted."""
    prefix = f".{out.name}{TEMP_MARKER}"
    if len(os.fsencode(prefix)) + 32 > name_max(out.parent):
        prefix = f".{hashlib.sha256(os.fsencode(out.name)).hexdigest()[:32]}{TEMP_MARKER}"
    return prefix


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp files that a killed run (SIGKILL, power loss) left beside OUT. The writer's pid is
    part of the name, so a conversion still running elsewhere keeps its file."""
    removed = []
    for path in out.parent.glob(temp_prefix(out) + "*"):
        pid_text = path.name[len(temp_prefix(out)):].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this very process cannot still be in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        raise ConversionError(
            f"Not enough free space in {directory}: the converted file needs {human(needed)} "
            f"and only {human(free)} is free. Free some space or write OUT elsewhere."
        )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. `timeout`, a service manager) cleans up like Ctrl-C instead of dying mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_converted(plan: Plan, out: Path, *, force: bool = False,
                    before_publish: Callable[[Path], None] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> WriteStats:
    """Write the converted file to a temp file beside OUT, fsync it, run `before_publish` on it
    (verification), then move it to OUT. Any failure or interrupt removes the temp file."""
    check_output(plan.source, out, force)
    clean_stale_temps(out)
    with open(plan.source, "rb") as src:
        raw = _read_exact(src, plan.header.tensor_info_span[1], plan.source)
        header = build_header(plan, raw)
        del raw
        pieces = data_pieces(plan)
        total = len(header) + pieces_bytes(pieces)
        check_space(out.parent, total)
        start = time.perf_counter()
        tmp = out.parent / f"{temp_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
        with _sigterm_as_interrupt():
            try:
                _write_temp(src, tmp, header, pieces, plan, progress)
                if before_publish is not None:
                    before_publish(tmp)
                _publish(tmp, out, force)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return WriteStats(total, time.perf_counter() - start)


def _read_exact(fh: Any, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ConversionError(f"{path} changed while it was being read; try again.")
    return data


def _write_temp(src: Any, tmp: Path, header: bytes, pieces: list[Piece], plan: Plan,
                progress: Callable[[int, int], None] | None) -> None:
    if os.fstat(src.fileno()).st_size != plan.header.file_size:
        raise ConversionError(f"{plan.source} changed size since its header was read; try again.")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise ConversionError(f"Cannot create {tmp}: {exc.strerror}; nothing was written to the output.") from None
    try:
        try:
            _write_all(fd, header)
            _write_pieces(src.fileno(), fd, plan.header.data_offset, pieces, progress)
            os.fsync(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConversionError(f"The disk holding {tmp.parent} filled up while writing; "
                                      "nothing was written to the output. Free some space and retry.") from None
            raise ConversionError(f"Writing {tmp} failed: {exc}; nothing was written to the output.") from None
    finally:
        os.close(fd)


def _write_pieces(src_fd: int, dst_fd: int, data_offset: int, pieces: list[Piece],
                  progress: Callable[[int, int], None] | None) -> None:
    """The data section: IN's ranges streamed (copy_range), the new tensor's bytes written."""
    total, done = pieces_bytes(pieces), 0
    for piece in pieces:
        if isinstance(piece, tuple):
            offset, length = piece
            report = None if progress is None else (lambda n, _, base=done: progress(base + n, total))
            copy_range(src_fd, dst_fd, data_offset + offset, length, report)
            done += length
        else:
            _write_all(dst_fd, piece)
            done += len(piece)
            if progress is not None:
                progress(done, total)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Copy `length` bytes of src from `offset` to dst's current position, COPY_CHUNK at a time:
    in the kernel with copy_file_range where it works, else through one reused buffer. Either way
    memory use does not depend on the model's size."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    buf = None
    while done < length:
        n = min(COPY_CHUNK if use_kernel else BUFFER_CHUNK, length - done)
        if use_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel = False
                continue
        else:
            if buf is None:
                buf = memoryview(bytearray(BUFFER_CHUNK))
            copied = os.preadv(src_fd, [buf[:n]], offset + done)
            _write_all(dst_fd, buf[:copied])
        if copied == 0:
            raise ConversionError("The input file ended early (it changed during the copy); try again.")
        done += copied
        if progress is not None:
            progress(done, length)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Give the temp file its final name atomically. Without --force a hard link is used, which
    fails instead of clobbering an OUT that appeared meanwhile."""
    if force:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ConversionError(f"{out} appeared while converting; pass --force to replace it.") from None
        except OSError:  # a filesystem without hard links
            if os.path.lexists(out):
                raise ConversionError(f"{out} appeared while converting; pass --force to replace it.") from None
            os.replace(tmp, out)
        else:
            tmp.unlink()
    fsync_dir(out.parent)


# --- Verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    tokens: int
    positions: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    seconds: float
    noise_floor: float | None = None  # measured for bakes through rope_freqs (see verify_conversion)

    @property
    def threshold(self) -> float:
        """The largest difference accepted: the tolerance, or NOISE_MULTIPLE times the noise floor."""
        return self.tolerance if self.noise_floor is None else max(self.tolerance, NOISE_MULTIPLE * self.noise_floor)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "positions": list(self.positions), "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "noise_floor": self.noise_floor, "threshold": self.threshold,
                "passed": self.passed, "seconds": round(self.seconds, 2)}


FALLBACK_TEXT = (
    "The converter copies every tensor unchanged and only rewrites the metadata that tells the runtime "
    "how to rotate positions. A long prompt checks that the file alone reproduces the preset. "
)


def check_verifiable(plan: Plan) -> None:
    """--verify runs IN under the preset's runtime settings as the reference: refuse where none
    can stand for the file (per-dimension factors have no runtime setting), before writing."""
    p, prov = plan.params, plan.facts.provenance
    if p.rope_freqs:
        raise ConversionError(
            f"--verify compares OUT with IN run under the preset's llama.cpp settings, and preset {p.preset!r}'s "
            "per-dimension factors have none; nothing was written. Convert without --verify (the factors are "
            "written exactly as the preset gives them)."
        )
    if prov is not None and prov.baked_freqs:
        raise ConversionError(
            f"{plan.source.name} carries per-dimension RoPE factors an earlier conversion baked in (preset "
            f"{prov.preset}), which no runtime setting removes, so it cannot stand for the original model in "
            f"--verify; nothing was written. Convert and verify from the original file ({prov.source_file})."
        )


def verify_conversion(original: Path, converted: Path, params: RuntimeParams, *, text: str | None = None,
                      n_tokens: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                      threads: int | None = None, noise_probe: bool = False) -> VerifyResult:
    """Run one prompt longer than the trained context through the original (with the preset's
    runtime parameters) and the converted file (with none), and compare the logits.

    `noise_probe` (bakes of YaRN into rope_freqs, whose angles come from other float operations than
    the runtime's, so never bit-exact): also run the original with the frequency scale one float32
    step away, and accept differences up to NOISE_MULTIPLE times the difference that step makes."""
    start = time.perf_counter()
    n = min(params.n_ctx, n_tokens or params.trained_ctx + VERIFY_EXTRA_TOKENS)
    tokens, positions, expected = _reference_logits(original, params, text, n, threads)
    noise = None
    if noise_probe:
        _, _, nudged = _reference_logits(original, replace(params, rope_freq_scale=_next_float32(params.rope_freq_scale)),
                                         text, n, threads)
        noise = _max_diff(expected, nudged)
    got = logits_from_file(converted, params, tokens, positions, threads=threads)
    return VerifyResult(len(tokens), tuple(positions), _max_diff(expected, got), tolerance,
                        time.perf_counter() - start, noise)


def _reference_logits(original: Path, params: RuntimeParams, text: str | None, n: int,
                      threads: int | None) -> tuple[list[int], list[int], Any]:
    from .runtime import Resolved, RunSpec, open_engine  # loads llama_cpp: only --verify needs it

    facts = facts_from_header(read_header(original))
    with open_engine(Resolved(RunSpec(model=original, threads=threads), facts, Ladder((params,)))) as engine:
        tokens = prompt_tokens(engine, text, n)
        positions = verify_positions(len(tokens), params.trained_ctx)
        return tokens, positions, engine.logits_at(tokens, positions)


def _max_diff(a: Any, b: Any) -> float:
    diff = float(abs(a.astype("float64") - b.astype("float64")).max())
    return math.inf if math.isnan(diff) else diff


def _next_float32(value: float) -> float:
    """The float32 just above `value` (llama.cpp holds the frequency scale as a C float)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def logits_from_file(converted: Path, params: RuntimeParams, tokens: list[int], positions: list[int], *,
                     threads: int | None = None) -> Any:
    """Logits of `converted` run with no RoPE settings at all, as a plain llama-server run would
    (only the window and the context settings of `params`): what the file alone carries."""
    from .runtime import Resolved, RunSpec, open_engine

    facts = facts_from_header(read_header(converted))
    from_file = replace(file_params(facts, params.n_ctx), flash_attn=params.flash_attn, type_k=params.type_k,
                        type_v=params.type_v, n_batch=params.n_batch, n_ubatch=params.n_ubatch)
    with open_engine(Resolved(RunSpec(model=converted, threads=threads), facts, Ladder((from_file,)))) as engine:
        return engine.logits_at(tokens, positions)


def prompt_tokens(engine: Any, text: str | None, n: int) -> list[int]:
    """`n` tokens of `text`, repeated when it is too short (a prompt still exercises every position)."""
    text = text or FALLBACK_TEXT
    tokens = engine.tokenize(text, add_bos=True)
    body = engine.tokenize(text, add_bos=False) or tokens
    while len(tokens) < n:
        tokens += body
    return tokens[:n]


def verify_positions(n: int, trained: int) -> list[int]:
    wanted = {n // 4, n // 2, trained - 1, trained, n - 3, n - 2, n - 1}
    return sorted(p for p in wanted if 0 <= p < n)


# --- The one entry point -----------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionResult:
    plan: Plan
    output: Path
    written: bool
    stats: WriteStats | None
    verify: VerifyResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.plan.source),
            "output": str(self.output),
            "preset": self.plan.params.preset,
            "method": self.plan.params.method,
            "params": self.plan.params.to_dict(),
            "changes": [c.to_dict() for c in self.plan.changes],
            "tensor": self.plan.tensor.to_dict() if self.plan.tensor else None,
            "notes": list(self.plan.notes),
            "dry_run": not self.written,
            "written": self.written,
            "bytes": self.stats.bytes if self.stats else None,
            "seconds": round(self.stats.seconds, 3) if self.stats else None,
            "verify": self.verify.to_dict() if self.verify else None,
        }


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], preset: str, *, ctx: int | None = None,
            dry_run: bool = False, force: bool = False, verify: bool = False, verify_text: str | None = None,
            verify_tokens: int | None = None, tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> ConversionResult:
    """Convert SOURCE into OUT with PRESET baked into its metadata (see module docstring).

    With `verify`, the temp file is checked before it is published: a failed check leaves no OUT."""
    out = Path(out).expanduser()
    if dry_run and verify:
        raise ConversionError("--verify needs the converted file; drop --dry-run to convert and verify.")
    plan = plan_conversion(source, preset, ctx)
    if verify:
        check_verifiable(plan)
    if dry_run:
        check_output(plan.source, out, force, probe=False)  # a dry run writes nothing, not even a probe
        return ConversionResult(plan, out, False, None, None)
    results: list[VerifyResult] = []

    def check(tmp: Path) -> None:
        result = verify_conversion(plan.source, tmp, plan.params, text=verify_text, n_tokens=verify_tokens,
                                   tolerance=tolerance, threads=threads, noise_probe=plan.baked_yarn)
        results.append(result)
        if not result.passed:
            raise ConversionError(
                f"Verification failed: the converted file's logits differ from the original's with preset "
                f"{plan.params.preset} by up to {result.max_abs_diff:.3g} (accepted: {result.threshold:.3g}) over "
                f"{result.tokens:,} tokens; {out} was not written."
            )

    stats = write_converted(plan, out, force=force, before_publish=check if verify else None, progress=progress)
    return ConversionResult(plan, out, True, stats, results[0] if results else None)
