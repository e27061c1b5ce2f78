"""Presets (validated TOML data), where they are found, and their resolution against a model's
facts into RuntimeParams (localctx.params)."""
from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from gguf import Keys

from .errors import PresetError
from .files import read_limited
from .gguf_meta import FLOAT32_MAX, ModelFacts, arch_key
from .params import KV_CACHE_TYPES, MAX_CTX, MIN_CTX, RuntimeParams
from .paths import shipped_presets_dir, user_presets_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHODS = ("none", "extrapolate", "linear", "ntk", "yarn", "auto", "self-extend")
ROPE_METHODS = ("linear", "ntk", "yarn")
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class ContextSettings:
    """Optional llama.cpp context settings a preset may carry."""

    flash_attn: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    n_batch: int = 512
    n_ubatch: int = 512
    swa_full: bool = False  # sliding-window layers' cache for the whole context (memory only)


@dataclass(frozen=True)
class YarnOverrides:
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    ext_factor: float | None = None  # None: llama.cpp's default (1.0 for YaRN)
    attn_factor: float | None = None  # None: llama.cpp's default (0.1·ln(s) + 1 for YaRN)


# Scale factors `auto` rounds a request's need up to (s = 1, the trained context, comes first; the
# maximum window is always the last step).
DEFAULT_STEPS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
DEFAULT_AUTO_FACTOR = 4  # auto's maximum window when neither --ctx nor target_ctx names one
AUTO_SCALINGS = ("yarn", "ntk", "linear", "extrapolate")


@dataclass(frozen=True)
class AutoSettings:
    """How `auto` scales a request past the trained context: the method, and the steps its
    scale factor is rounded up to (a ladder: every request gets the smallest step that holds it)."""

    method: str = "yarn"
    steps: tuple[float, ...] = DEFAULT_STEPS


@dataclass(frozen=True)
class SelfExtendSettings:
    """Self-Extend (Jin et al., 2024): a neighbour window of exact positions; further back,
    positions grouped G to one, so no attention sees a distance past the trained context."""

    group: int = 1
    window: int = 0


def self_extend_reach(trained: int, group: int, window: int) -> int:
    """The most tokens (prompt and answer) Self-Extend holds below the trained context's positions:
    (trained - window) x group + window, less group - 1 for the grouping's rounding."""
    return (trained - window) * group + window - (group - 1)


@dataclass(frozen=True)
class RopeFreqsSettings:
    """Per-dimension RoPE factors: pair i rotates at its trained frequency divided by factors[i]
    (ggml's freq_factors), and attention logits are scaled by attn_factor. llama.cpp reads them
    only from a GGUF, so such a preset is baked by `localctx convert`, never run with --preset."""

    factors: tuple[float, ...] = ()
    attn_factor: float = 1.0


# The methods [rope_freqs] combines with: RoPE otherwise as trained, so the factors alone say how
# positions rotate (YaRN, linear and NTK would rescale on top of them).
ROPE_FREQS_METHODS = ("none", "extrapolate")


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    target_ctx: int | None = None
    description: str = ""
    context: ContextSettings = field(default_factory=ContextSettings)
    yarn: YarnOverrides = field(default_factory=YarnOverrides)
    source: str = "built-in"
    auto: AutoSettings = field(default_factory=AutoSettings)
    self_extend: SelfExtendSettings = field(default_factory=SelfExtendSettings)
    rope_freqs: RopeFreqsSettings | None = None


@dataclass(frozen=True)
class Ladder:
    """The windows a preset runs at, smallest first: one for a static preset; for `auto`, the
    trained context unscaled, then one per step up to the maximum window. Each request runs at
    the smallest step that holds its prompt and answer budget."""

    steps: tuple[RuntimeParams, ...]
    default_max: bool = False  # the maximum was not asked for (auto's default): memory may lower it

    @property
    def adaptive(self) -> bool:
        return len(self.steps) > 1

    @property
    def top(self) -> RuntimeParams:
        """The largest window: what memory is planned for and what a request may use at most."""
        return self.steps[-1]

    @property
    def bottom(self) -> RuntimeParams:
        return self.steps[0]

    def step_for(self, needed: int) -> RuntimeParams:
        """The smallest step whose window holds `needed` tokens (the largest when none does: the
        engine's overflow check refuses those)."""
        return next((step for step in self.steps if step.n_ctx >= needed), self.top)

    def map(self, change: Callable[[RuntimeParams], RuntimeParams]) -> Ladder:
        return Ladder(tuple(change(step) for step in self.steps), self.default_max)


def file_params(facts: ModelFacts, n_ctx: int | None = None) -> RuntimeParams:
    """Parameters that leave every RoPE setting to the GGUF file itself, as a plain llama-server
    run would (used to check that a converted file carries its preset on its own)."""
    ctx = n_ctx or facts.context_length
    return RuntimeParams(
        preset="(from file)",
        method="file",
        n_ctx=ctx,
        trained_ctx=facts.trained_context,
        scale=ctx / facts.trained_context if facts.trained_context else 1.0,
        rope_scaling_type=None,
        rope_freq_base=0.0,
        rope_freq_scale=0.0,
    )


# --- Loading ---------------------------------------------------------------------------------

_TOP_KEYS = {"description", "method", "target_ctx", "context", "yarn", "auto", "self_extend", "rope_freqs"}
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
MAX_ROPE_FREQS = 4096  # factors in one [rope_freqs]: a head of 8192 rotary dimensions; none is near it


def _check_type(value: Any, expected: type | tuple[type, ...], where: str) -> Any:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int in Python; a preset saying `n_batch = true` is still a mistake.
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise PresetError(f"{where} must be {names}, not {value!r}")
    return value


def _section(data: dict[str, Any], name: str, cls: type, types: dict[str, Any], where: str) -> Any:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        raise PresetError(f"{where}: [{name}] must be a table")
    unknown = set(raw) - set(types)
    if unknown:
        raise PresetError(f"{where}: unknown field {name}.{sorted(unknown)[0]} (allowed: {', '.join(sorted(types))})")
    values = {key: _check_type(value, types[key], f"{where}: {name}.{key}") for key, value in raw.items()}
    return cls(**values)


def parse_preset(data: dict[str, Any], name: str, source: str) -> Preset:
    """Validate a preset's TOML data; every error names the file and the field."""
    where = source
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PresetError(f"{where}: unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    method = data.get("method")
    if method not in METHODS:
        raise PresetError(f"{where}: field 'method' must be one of {', '.join(METHODS)}, not {method!r}")
    target = data.get("target_ctx")
    if target is not None:
        _check_type(target, int, f"{where}: target_ctx")
        if not 256 <= target <= 4 * 1024 * 1024:
            raise PresetError(f"{where}: target_ctx must be between 256 and 4194304, not {target}")
    if method in ("extrapolate", "self-extend", *ROPE_METHODS) and target is None:
        raise PresetError(f"{where}: method {method!r} needs field 'target_ctx'")
    context = _section(data, "context", ContextSettings,
                       {"flash_attn": bool, "type_k": str, "type_v": str, "n_batch": int, "n_ubatch": int,
                        "swa_full": bool}, where)
    for attr in ("type_k", "type_v"):
        if getattr(context, attr) not in KV_CACHE_TYPES:
            raise PresetError(f"{where}: context.{attr} must be one of {', '.join(KV_CACHE_TYPES)}")
    if context.type_v != "f16" and not context.flash_attn:
        raise PresetError(f"{where}: context.type_v = {context.type_v!r} needs flash_attn = true (llama.cpp rule)")
    for attr in ("n_batch", "n_ubatch"):
        if getattr(context, attr) < 1:
            raise PresetError(f"{where}: context.{attr} must be at least 1")
    num = (int, float)
    yarn = _section(data, "yarn", YarnOverrides,
                    {"beta_fast": num, "beta_slow": num, "ext_factor": num, "attn_factor": num}, where)
    for attr in ("beta_fast", "beta_slow", "ext_factor", "attn_factor"):
        value = getattr(yarn, attr)
        if value is not None and not (math.isfinite(value) and value >= 0):  # TOML allows nan and inf
            raise PresetError(f"{where}: yarn.{attr} must be a finite number of at least 0, not {value!r}")
    auto = _auto_settings(data, method, where)
    self_extend = _self_extend_settings(data, method, where)
    rope_freqs = _rope_freqs_settings(data, method, where)
    description = _check_type(data.get("description", ""), str, f"{where}: description")
    return Preset(name, method, target, description, context, yarn, source, auto, self_extend, rope_freqs)


def _rope_freqs_settings(data: dict[str, Any], method: str, where: str) -> RopeFreqsSettings | None:
    if data.get("rope_freqs") is None:
        return None
    if method not in ROPE_FREQS_METHODS:
        raise PresetError(f"{where}: [rope_freqs] goes with method = 'none' or 'extrapolate' (RoPE otherwise as "
                          f"trained), not {method!r}: the factors alone set each dimension's frequency")
    raw = _section(data, "rope_freqs", dict, {"factors": list, "attn_factor": (int, float)}, where)
    factors = raw.get("factors")
    if factors is None:
        raise PresetError(f"{where}: [rope_freqs] needs factors = [...], one per pair of rotary dimensions")
    for value in factors:
        _check_type(value, (int, float), f"{where}: each of rope_freqs.factors")
    if not 1 <= len(factors) <= MAX_ROPE_FREQS or not all(_positive(v) for v in factors):
        raise PresetError(f"{where}: rope_freqs.factors must be 1 to {MAX_ROPE_FREQS} finite numbers above 0 "
                          f"(they divide each pair's frequency), not {factors[:8]!r}{'...' if len(factors) > 8 else ''}")
    attn = raw.get("attn_factor", 1.0)
    if not _positive(attn):
        raise PresetError(f"{where}: rope_freqs.attn_factor must be a finite number above 0, not {attn!r}")
    return RopeFreqsSettings(tuple(float(v) for v in factors), float(attn))


def _positive(value: float) -> bool:
    # llama.cpp keeps these as C floats and divides by the factors: neither 0 nor inf once stored.
    return math.isfinite(value) and FLOAT32_MIN_NORMAL <= value <= FLOAT32_MAX


def _self_extend_settings(data: dict[str, Any], method: str, where: str) -> SelfExtendSettings:
    if data.get("self_extend") is None:
        if method == "self-extend":
            raise PresetError(f"{where}: method 'self-extend' needs a [self_extend] table with group and window")
        return SelfExtendSettings()
    if method != "self-extend":
        raise PresetError(f"{where}: [self_extend] applies to method = 'self-extend' only, not {method!r}")
    settings = _section(data, "self_extend", SelfExtendSettings, {"group": int, "window": int}, where)
    if not 2 <= settings.group <= 1024:
        raise PresetError(f"{where}: self_extend.group must be a whole number from 2 to 1024, not {settings.group}")
    if settings.window < 1:
        raise PresetError(f"{where}: self_extend.window must be at least 1 token, not {settings.window}")
    return settings


def _auto_settings(data: dict[str, Any], method: str, where: str) -> AutoSettings:
    raw = data.get("auto")
    if raw is None:
        return AutoSettings()
    if method != "auto":
        raise PresetError(f"{where}: [auto] applies to method = 'auto' only, not {method!r}")
    settings = _section(data, "auto", AutoSettings, {"method": str, "steps": list}, where)
    if settings.method not in AUTO_SCALINGS:
        raise PresetError(f"{where}: auto.method must be one of {', '.join(AUTO_SCALINGS)}, not {settings.method!r}")
    steps = settings.steps
    for value in steps:
        _check_type(value, (int, float), f"{where}: each of auto.steps")
    if not steps or not all(math.isfinite(v) and 1 < v <= MAX_CTX for v in steps) or list(steps) != sorted(set(steps)):
        raise PresetError(f"{where}: auto.steps must be scale factors above 1, increasing, "
                          f"for example [2, 4, 8], not {list(steps)!r}")
    return AutoSettings(settings.method, tuple(float(v) for v in steps))


MAX_PRESET_BYTES = 2**20  # a preset is a few hundred bytes; anything near this is not one


def load_preset_file(path: Path) -> Preset:
    """A preset from its TOML file; PresetError naming the file for anything wrong with it."""
    data = read_limited(path, MAX_PRESET_BYTES, PresetError, "preset file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PresetError(f"{path}: cannot read preset file: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise PresetError(f"{path}: not a preset: its tables or arrays are nested too deeply to read.") from None
    except Exception as exc:  # the TOML parser on hostile input: a clean refusal, whatever it raises
        raise PresetError(f"{path}: not valid TOML ({type(exc).__name__}: {exc}).") from None
    return parse_preset(parsed, path.stem, str(path))


def preset_files() -> dict[str, Path]:
    """Preset name → file; user presets override shipped ones of the same name."""
    found: dict[str, Path] = {}
    for directory in (shipped_presets_dir(), user_presets_dir()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found[path.stem] = path
    return found


@dataclass(frozen=True)
class PresetProblem:
    """A preset file that could not be loaded, and why (listings skip it and report it)."""

    path: Path
    reason: str


def scan_presets() -> tuple[list[Preset], list[PresetProblem]]:
    """Every preset that loads, and the files that do not: one bad user file must not hide the
    others. Callers decide how to report the problems (the library never prints)."""
    presets: list[Preset] = []
    problems: list[PresetProblem] = []
    for path in preset_files().values():
        try:
            presets.append(load_preset_file(path))
        except PresetError as exc:
            problems.append(PresetProblem(path, str(exc).removeprefix(f"{path}: ")))
    return presets, problems


def list_presets() -> list[Preset]:
    """Every preset that loads (see `scan_presets` for the ones that do not)."""
    return scan_presets()[0]


def load_preset(name: str) -> Preset:
    """A preset by name, or by path to a TOML file."""
    if name.endswith(".toml") and Path(name).exists():  # a FIFO or a directory is refused by name
        return load_preset_file(Path(name))
    files = preset_files()
    if name not in files:
        close = difflib.get_close_matches(name, files, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise PresetError(
            f"Unknown preset {name!r}.{hint} Available: {', '.join(sorted(files))}. "
            f"User presets go in {user_presets_dir()} (see `localctx presets list`)."
        )
    return load_preset_file(files[name])


# --- Resolution --------------------------------------------------------------------------------


def resolve(preset: Preset, facts: ModelFacts, ctx: int | None = None) -> RuntimeParams:
    """Turn a preset into explicit llama.cpp parameters for this model.

    `ctx` overrides the preset's target (and is what `auto` needs). Scaling is always computed
    from the model's trained context, never from scaling already in the file.
    """
    method = preset.method
    target = ctx if ctx is not None else preset.target_ctx
    trained = facts.trained_context
    notes: list[str] = []
    if trained <= 0:
        trained = _unscaled_window(preset, facts, target)
        notes.append(f"the file records no trained context: {trained} tokens, RoPE unscaled")
    if method == "auto" and target is None:
        # Positions learned per index cannot grow; anything else may, up to auto's default maximum.
        target = trained if facts.positions == "learned" else DEFAULT_AUTO_FACTOR * trained
    if method == "none":
        target = target or trained
    target = int(target or trained)
    if not MIN_CTX <= target <= MAX_CTX:
        raise PresetError(f"A context of {target:,} tokens is outside the range localctx runs "
                          f"({MIN_CTX} to {MAX_CTX:,}): pass --ctx N within it.")
    scale = target / trained
    if method == "self-extend":
        return _self_extend(preset, facts, target, trained, notes)
    if method == "auto":
        if target <= trained:
            method = "none"
        else:
            method = preset.auto.method if facts.positions == "rope" else "extrapolate"
    _check_positions(preset, facts, method, target)
    if target <= trained and method != "extrapolate":
        method = "none"
    elif method == "none" and target > trained:
        method = "extrapolate"
    if target <= trained and preset.method in ROPE_METHODS:
        notes.append(f"target {target} fits the trained context {trained}: no scaling applied")
    params = _build(preset, facts, method, target, trained, scale if target > trained else 1.0, notes)
    return _with_rope_freqs(preset, facts, params) if preset.rope_freqs else params


def resolve_ladder(preset: Preset, facts: ModelFacts, ctx: int | None = None) -> Ladder:
    """The windows a preset runs at on this model (see Ladder). For `auto`: the trained context
    unscaled, then trained × s for each of its steps below the maximum window, then the maximum."""
    top = resolve(preset, facts, ctx)
    if preset.method != "auto" or top.n_ctx <= top.trained_ctx:
        return Ladder((top,))
    trained = top.trained_ctx
    # A factor so close to 1 that its window rounds to the trained one is not a step of its own.
    windows = [trained] + sorted({w for s in preset.auto.steps if trained < (w := int(trained * s)) < top.n_ctx})
    steps = tuple(resolve(preset, facts, ctx=window) for window in windows) + (top,)
    return Ladder(steps, default_max=ctx is None and preset.target_ctx is None)


def _unscaled_window(preset: Preset, facts: ModelFacts, target: int | None) -> int:
    """The window for a file that records no trained context ({arch}.context_length 0 or absent):
    with nothing to scale from, only an unscaled window the user names can run."""
    if target is None or preset.method in ROPE_METHODS:
        key = arch_key(Keys.LLM.CONTEXT_LENGTH, facts.architecture)
        raise PresetError(
            f"{facts.name} does not record the context it was trained on ({key} is 0 or missing), so there "
            f"is nothing to scale from. Name the window yourself, unscaled: --preset native --ctx N "
            "(for example --ctx 4096)."
        )
    return target


def _check_positions(preset: Preset, facts: ModelFacts, method: str, target: int) -> None:
    trained = facts.trained_context
    if facts.positions == "learned" and target > trained:
        raise PresetError(
            f"{facts.name} ({facts.architecture}) learns one position embedding per position, up to "
            f"{trained}. Position {trained + 1} has no embedding at all, so no scaling can extend this "
            f"model past {trained} tokens. Use a context of at most {trained}, or summarize long inputs "
            "with `localctx summarize` (map-reduce)."
        )
    if facts.positions == "alibi" and method in ROPE_METHODS:
        raise PresetError(
            f"Preset {preset.name!r} rescales RoPE, but {facts.name} ({facts.architecture}) uses ALiBi "
            "attention biases, which have no rotary frequencies to rescale. ALiBi extrapolates by design: "
            f"grow the window with `--preset extrapolate-32k` or `--preset auto --ctx {max(target, trained)}`."
        )
    if facts.positions == "none" and method in ROPE_METHODS:
        raise PresetError(
            f"{facts.name} ({facts.architecture}) has no positional encoding to rescale; "
            "use `--preset auto --ctx N` to set the window."
        )


def _build(preset: Preset, facts: ModelFacts, method: str, target: int, trained: int, scale: float,
           notes: list[str]) -> RuntimeParams:
    base = facts.trained_freq_base or 0.0
    rope = facts.positions == "rope"
    c = preset.context
    common: dict[str, Any] = dict(
        preset=preset.name, method=method, n_ctx=target, trained_ctx=trained, scale=scale,
        flash_attn=c.flash_attn, type_k=c.type_k, type_v=c.type_v, swa_full=c.swa_full,
        n_batch=min(c.n_batch, target), n_ubatch=min(c.n_ubatch, c.n_batch, target), notes=tuple(notes),
    )
    if not rope:
        return RuntimeParams(rope_scaling_type=None, rope_freq_base=0.0, rope_freq_scale=0.0, **common)
    if method in ("none", "extrapolate", "self-extend"):  # Self-Extend keeps the trained frequencies
        return RuntimeParams(rope_scaling_type="none", rope_freq_base=base, rope_freq_scale=1.0, **common)
    if method == "linear":
        return RuntimeParams(rope_scaling_type="linear", rope_freq_base=base, rope_freq_scale=1.0 / scale, **common)
    if method == "ntk":
        return _ntk(preset, facts, base, scale, common)
    y = preset.yarn
    return RuntimeParams(
        rope_scaling_type="yarn", rope_freq_base=base, rope_freq_scale=1.0 / scale, yarn_orig_ctx=trained,
        yarn_ext_factor=-1.0 if y.ext_factor is None else float(y.ext_factor),
        yarn_attn_factor=-1.0 if y.attn_factor is None else float(y.attn_factor),
        yarn_beta_fast=float(y.beta_fast), yarn_beta_slow=float(y.beta_slow), **common,
    )


def _with_rope_freqs(preset: Preset, facts: ModelFacts, params: RuntimeParams) -> RuntimeParams:
    """A [rope_freqs] preset's factors, checked against this model: one per pair of rotary dimensions."""
    settings = preset.rope_freqs
    assert settings is not None
    if facts.positions != "rope":
        raise PresetError(f"Preset {preset.name!r} sets RoPE factors ([rope_freqs]), and {facts.name} "
                          f"({facts.architecture}) has {facts.positions} positions, not RoPE.")
    dims = facts.rope_dims or facts.head_dim_k
    if len(settings.factors) != dims // 2:
        raise PresetError(
            f"Preset {preset.name!r}: [rope_freqs] has {len(settings.factors)} factors, but {facts.name} rotates "
            f"{dims} dimensions per head, that is {dims // 2} pairs: give exactly {dims // 2} factors, one per pair."
        )
    note = (f"per-dimension factors ([rope_freqs]) have no llama.cpp flag: `localctx convert MODEL OUT.gguf --preset "
            f"{preset.name}` bakes them into OUT, then run OUT with --preset native")
    return replace(params, rope_freqs=settings.factors, rope_attn_factor=settings.attn_factor,
                   notes=params.notes + (note,))


def _self_extend(preset: Preset, facts: ModelFacts, target: int, trained: int, notes: list[str]) -> RuntimeParams:
    """RoPE unscaled at a window past the trained context; the engine groups positions as it goes."""
    g, w = preset.self_extend.group, preset.self_extend.window
    if facts.positions != "rope":
        raise PresetError(
            f"Preset {preset.name!r} (Self-Extend) regroups rotary positions, and {facts.name} ({facts.architecture}) "
            f"has {'ALiBi biases' if facts.positions == 'alibi' else facts.positions + ' positions'}, not RoPE."
        )
    if facts.sliding_window:
        raise PresetError(
            f"Preset {preset.name!r} (Self-Extend) regroups positions, and {facts.name} ({facts.architecture}) has "
            f"sliding-window layers ({facts.n_sliding_layers} of {facts.n_layers} see only the last "
            f"{facts.sliding_window:,} tokens): llama.cpp masks them by position, so grouped positions would show "
            "them tokens outside their window, and it cannot shift a window-sized cache. Use a YaRN preset instead."
        )
    if w >= trained:
        raise PresetError(f"Preset {preset.name!r}: self_extend.window {w:,} must be below the trained context "
                          f"{trained:,} of {facts.name}.")
    if target <= trained:
        notes.append(f"target {target} fits the trained context {trained}: no grouping needed")
        return _build(preset, facts, "none", target, trained, 1.0, notes)
    reach = self_extend_reach(trained, g, w)
    if target > reach:
        raise PresetError(
            f"Preset {preset.name!r}: Self-Extend with group {g} and window {w:,} reaches (trained {trained:,} - "
            f"window {w:,}) x {g} + {w:,} - {g - 1} = {reach:,} tokens on {facts.name}, not {target:,}. "
            "Use a larger group, or a smaller --ctx."
        )
    params = _build(preset, facts, "self-extend", target, trained, target / trained, notes)
    return replace(params, group_size=g, neighbor_window=w)


def _ntk(preset: Preset, facts: ModelFacts, base: float, scale: float, common: dict[str, Any]) -> RuntimeParams:
    """NTK-aware scaling: the base grows by s^(d/(d-2)) for d rotary dimensions, which is undefined
    at d = 2 and can overflow the C float llama.cpp keeps the base in."""
    dims = facts.rope_dims or facts.head_dim_k
    if dims <= 2:
        raise PresetError(
            f"Preset {preset.name!r} (NTK) needs more than 2 rotary dimensions, and {facts.name} has {dims}: "
            "NTK's base exponent d/(d-2) is undefined there. Use a YaRN or linear preset instead."
        )
    new_base = base * scale ** (dims / (dims - 2))
    if not new_base <= FLOAT32_MAX:
        raise PresetError(
            f"Preset {preset.name!r} (NTK) would raise the RoPE base of {facts.name} from {base:g} to {new_base:.3g}, "
            "past what llama.cpp can hold. Use a YaRN or linear preset instead."
        )
    return RuntimeParams(rope_scaling_type="none", rope_freq_base=new_base, rope_freq_scale=1.0, **common)


def applicable(preset: Preset, facts: ModelFacts) -> tuple[bool, str]:
    """Whether a preset applies to a model, and why not (for `inspect` and `presets list`)."""
    try:
        ladder = resolve_ladder(preset, facts)
    except PresetError as exc:
        return False, str(exc).split(". ")[0]  # the first sentence (a path's dots are not its end)
    first, top = ladder.bottom, ladder.top
    if top.rope_freqs:
        return True, f"{top.method} to {top.n_ctx} with per-dimension factors, once baked by `localctx convert`"
    if ladder.adaptive:
        return True, f"{first.method} to {first.n_ctx}, then {top.method} in steps to {top.n_ctx}"
    return True, f"{top.method} to {top.n_ctx}"


def best_preset(facts: ModelFacts, accept: Callable[[Preset, RuntimeParams], bool],
                rank: Callable[[Preset, RuntimeParams], Any]) -> str | None:
    """The preset search, in one place: of every preset that resolves on this model ('auto' aside,
    it has no size of its own), the name of the accepted one ranked highest (the first on a tie)."""
    candidates = []
    for preset in list_presets():
        if preset.method == "auto" or preset.rope_freqs:  # rope_freqs: runs only once converted
            continue
        try:
            params = resolve(preset, facts)
        except PresetError:
            continue
        if accept(preset, params):
            candidates.append((rank(preset, params), preset.name))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def suggest_preset(facts: ModelFacts, needed: int) -> str:
    """The flag for the smallest preset whose window holds `needed` tokens on this model (one that
    keeps quality: no scaling, YaRN, or extrapolation where the positions extrapolate). A file with
    per-dimension factors baked in refuses RoPE rescaling on top (runtime.check_runnable), auto's
    included: its own factors are the extension, so only native's window grows."""
    baked = facts.provenance is not None and facts.provenance.baked_freqs

    def keeps_quality(preset: Preset, params: RuntimeParams) -> bool:
        extrapolates = preset.method == "extrapolate" and facts.positions != "rope"
        methods = ("none",) if baked else ("none", "yarn")
        return (preset.method in methods or extrapolates) and params.n_ctx >= needed

    name = best_preset(facts, keeps_quality, lambda _, params: -params.n_ctx)
    if name:
        return f"--preset {name}"
    window = -(-needed // 1024) * 1024
    if window > MAX_CTX:
        # No window localctx runs holds it: suggesting a --ctx the CLI refuses would mislead.
        return (f"none: {needed:,} tokens exceed the largest window localctx runs ({MAX_CTX:,}); shorten the "
                "input or the answer budget, or summarize with `localctx summarize`")
    return f"--preset {'native' if baked else 'auto'} --ctx {window}"
