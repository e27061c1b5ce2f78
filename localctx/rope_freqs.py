"""Per-dimension RoPE factors, the `rope_freqs.weight` tensor: which llama.cpp architectures apply
it, reading it from a GGUF, and a YaRN run expressed as such factors.

ggml rotates dimension pair i of a head by pos * base^(-2i/n_rot) / factor_i when a model has the
tensor, and multiplies cos and sin by the attention factor. YaRN, whatever its betas, extrapolation
and attention factors, only changes each pair's angle by a fixed ratio and cos/sin by one factor,
so a file with the matching tensor and `{arch}.rope.scaling.attn_factor` reproduces it with no
runtime settings at all, in every runtime that reads the tensor.
"""
from __future__ import annotations

import math

import gguf
import numpy as np

from .errors import ConversionError
from .gguf_meta import GGUFHeader, TensorInfo
from .params import RuntimeParams
from .presets import YARN_BETA_FAST, YARN_BETA_SLOW

ROPE_FREQS_TENSOR = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
MAX_FACTORS = 4096  # a tensor longer than this is not per-pair factors of any real head

_ARCH = gguf.MODEL_ARCH_NAMES
# From the llama.cpp of llama-cpp-python 0.3.36: the architectures whose loader creates
# LLM_TENSOR_ROPE_FREQS ({n_rot/2}, one tensor shared by every layer; src/models/<arch>.cpp,
# load_arch_tensors) and whose graph passes it, through model.get_rope_factors, to every RoPE
# together with the context's frequency scale, so the tensor does exactly what YaRN's runtime
# settings do. granite_swa and nanbeige are newer than the gguf package's names.
ROPE_FREQS_ARCHS = frozenset({
    _ARCH[gguf.MODEL_ARCH.LLAMA], _ARCH[gguf.MODEL_ARCH.LLAMA_EMBED], _ARCH[gguf.MODEL_ARCH.DECI],
    _ARCH[gguf.MODEL_ARCH.APERTUS], _ARCH[gguf.MODEL_ARCH.ARCEE], _ARCH[gguf.MODEL_ARCH.EXAONE],
    _ARCH[gguf.MODEL_ARCH.EXAONE4], _ARCH[gguf.MODEL_ARCH.EXAONE_MOE], _ARCH[gguf.MODEL_ARCH.GRANITE],
    _ARCH[gguf.MODEL_ARCH.GRANITE_MOE], _ARCH[gguf.MODEL_ARCH.GRANITE_HYBRID], "granite_swa",
    _ARCH[gguf.MODEL_ARCH.MINICPM], "nanbeige",
})
# Architectures that also create the tensor, but where it would not reproduce a YaRN run (or would
# not be read at all): why, for the refusal.
_NOT_LIKE_YARN = {
    _ARCH[gguf.MODEL_ARCH.LLAMA4]: "rotates its RoPE layers with a frequency scale of their own, which YaRN's "
                                   "runtime settings do not reach, so baked factors would differ from them",
    _ARCH[gguf.MODEL_ARCH.MISTRAL3]: "reads YaRN's own keys and ties its attention temperature to the original "
                                     "context key a bake removes",
    _ARCH[gguf.MODEL_ARCH.GEMMA4]: "applies rope_freqs.weight to its full-attention layers only",
    "gemma4-assistant": "applies rope_freqs.weight to its full-attention layers only",
    _ARCH[gguf.MODEL_ARCH.STEP35]: "applies rope_freqs.weight to its full-attention layers only",
    "eagle3": "is a speculative-decoding draft model, not one localctx converts",
    "dflash": "is a speculative-decoding draft model, not one localctx converts",
}


def check_arch(arch: str, what: str, remedy: str) -> None:
    """Refuse to bake factors (`what`) into an architecture whose llama.cpp does not apply them."""
    if arch in ROPE_FREQS_ARCHS:
        return
    reason = (f"{arch} {_NOT_LIKE_YARN[arch]}" if arch in _NOT_LIKE_YARN else
              f"{arch}'s llama.cpp loader ignores rope_freqs.weight (the tensor such a conversion writes), so the "
              "file would run unchanged")
    raise ConversionError(
        f"{what} can only be baked as per-dimension RoPE factors, and {reason}. Architectures that "
        f"apply them: {', '.join(sorted(ROPE_FREQS_ARCHS))}. {remedy} Nothing was written."
    )


def find_tensor(header: GGUFHeader) -> TensorInfo | None:
    return next((t for t in header.tensors if t.name == ROPE_FREQS_TENSOR), None)


def read_factors(header: GGUFHeader, pairs: int | None) -> tuple[float, ...] | None:
    """The file's rope_freqs.weight values (None: it has none), which llama.cpp requires to be one
    F32 factor per rotary pair (`pairs`; None: not checked, a model without RoPE ignores them)."""
    info = find_tensor(header)
    if info is None:
        return None
    shape_ok = len(info.shape) == 1 and info.shape[0] <= MAX_FACTORS and info.shape[0] == (pairs or info.shape[0])
    if info.ggml_type != gguf.GGMLQuantizationType.F32 or not shape_ok:
        raise ConversionError(
            f"{header.path}: {ROPE_FREQS_TENSOR} has shape {list(info.shape)} and type {_type_name(info.ggml_type)}; "
            f"llama.cpp needs one F32 factor per rotary pair{f' ({pairs})' if pairs else ''}. The file is damaged: "
            "download or convert it again."
        )
    with open(header.path, "rb") as fh:
        fh.seek(header.data_offset + info.offset)
        raw = fh.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise ConversionError(f"{header.path} changed while it was being read; try again.")
    return tuple(float(v) for v in np.frombuffer(raw, dtype="<f4"))


def _type_name(ggml_type: int) -> str:
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"#{ggml_type}"


def as_float32(values: tuple[float, ...]) -> tuple[float, ...]:
    """The values as the file stores them (float32), so comparisons and diffs are honest."""
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).astype("<f4"))


def to_bytes(values: tuple[float, ...]) -> bytes:
    return np.asarray(values, dtype=np.float64).astype("<f4").tobytes()


# --- YaRN as factors -------------------------------------------------------------------------
# What llama.cpp does with YaRN's settings, step for step, computed in float64. ggml's rope_yarn
# rotates pair i by theta_interp * (1 - mix_i) + theta_extrap * mix_i with theta_interp =
# freq_scale * theta_extrap and mix_i = ramp(i) * ext_factor: a factor 1 / ((1 - mix_i) *
# freq_scale + mix_i) on the unscaled angle.

YARN_DEFAULT_EXT = 1.0  # llama-context.cpp: ext_factor < 0 means 1 under YaRN


def _corr_dim(n_dims: int, n_ctx_orig: int, rotations: float, base: float) -> float:
    """ggml_rope_yarn_corr_dim: the pair index whose wavelength fits `rotations` turns in n_ctx_orig."""
    return n_dims * math.log(n_ctx_orig / (rotations * 2 * math.pi)) / (2 * math.log(base))


def corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the pairs where the ramp from extrapolation to interpolation starts and ends."""
    start = math.floor(_corr_dim(n_dims, n_ctx_orig, beta_fast, base))
    end = math.ceil(_corr_dim(n_dims, n_ctx_orig, beta_slow, base))
    return max(0.0, start), min(n_dims - 1.0, end)


def ramp(low: float, high: float, pair: int) -> float:
    """rope_yarn_ramp: 1 (extrapolate) below `low`, 0 (interpolate) above `high`, linear between."""
    y = (pair - low) / max(0.001, high - low)
    return 1 - min(1.0, max(0.0, y))


def yarn_ramp(params: RuntimeParams, n_rot: int) -> tuple[float, float]:
    """The pairs where this YaRN run's ramp starts and ends (its betas, or llama.cpp's defaults)."""
    fast = params.yarn_beta_fast if params.yarn_beta_fast >= 0 else YARN_BETA_FAST
    slow = params.yarn_beta_slow if params.yarn_beta_slow >= 0 else YARN_BETA_SLOW
    return corr_dims(n_rot, params.yarn_orig_ctx, params.rope_freq_base, fast, slow)


def yarn_factors(params: RuntimeParams, n_rot: int) -> tuple[float, ...]:
    """One factor per rotary pair that turns unscaled RoPE into this YaRN run."""
    fs = params.rope_freq_scale
    ext = params.yarn_ext_factor if params.yarn_ext_factor >= 0 else YARN_DEFAULT_EXT
    low, high = yarn_ramp(params, n_rot)
    factors = []
    for pair in range(n_rot // 2):
        mix = ramp(low, high, pair) * ext
        factors.append(1.0 / ((1 - mix) * fs + mix))
    return tuple(factors)


def yarn_attention(params: RuntimeParams) -> float:
    """The factor a YaRN run multiplies cos and sin by (before the file's own attn_factor).

    llama-context.cpp: with ext_factor != 0, llama.cpp replaces the attn_factor asked for by
    mscale(s) / (1 + 0.1 ln s) with mscale(s) = 1 + 0.1 ln s for s > 1, else 1; ggml's rope_yarn
    then multiplies by 1 + 0.1 ln(1 / freq_scale). With ext_factor 0 the attn_factor asked for
    (default 1) is used as it is."""
    ext = params.yarn_ext_factor if params.yarn_ext_factor >= 0 else YARN_DEFAULT_EXT
    if ext == 0:
        return params.yarn_attn_factor if params.yarn_attn_factor >= 0 else 1.0
    s = 1.0 / params.rope_freq_scale
    mscale = 0.1 * math.log(s) + 1.0 if s > 1.0 else 1.0
    return mscale / (1.0 + 0.1 * math.log(s)) * (1.0 + 0.1 * math.log(1.0 / params.rope_freq_scale))


def attn_factor_ignored(params: RuntimeParams) -> bool:
    """Whether llama.cpp drops the preset's YaRN attn_factor (it does while ext_factor != 0)."""
    ext = params.yarn_ext_factor if params.yarn_ext_factor >= 0 else YARN_DEFAULT_EXT
    return ext != 0 and params.yarn_attn_factor >= 0
