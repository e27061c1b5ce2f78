"""Planning a conversion: which metadata entries (and which rope_freqs tensor) a preset changes,
and what the original said, so that `native` can restore it exactly."""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from ..errors import ConversionError
from ..gguf_meta import (
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
from ..paths import resolve_model_path
from ..params import RuntimeParams
from ..presets import YARN_BETA_FAST, YARN_BETA_SLOW, load_preset, resolve
from .. import rope_freqs
from ..version import __version__

# The context the file said before any conversion, when it differs from the trained context (a model
# shipped with its own scaling): `native` needs it to restore the file exactly.
PROV_ORIG_FILE_CTX = PROVENANCE_PREFIX + "original.file_context_length"
TOOL_NAME = "localctx"

_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}





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


def override_metadata(plan: Plan, target: dict[str, Any]) -> Plan:
    """`plan`, writing these metadata values instead of its own changes (the tests' and benchmarks'
    models under another header, e.g. a smaller trained context)."""
    updates, changes = _diff(plan.header, target)
    return replace(plan, updates=updates, changes=tuple(changes))


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
