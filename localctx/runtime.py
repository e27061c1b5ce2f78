"""The orchestrator: the one path from what a user asked for to a loaded engine.

    RunSpec ──resolve──▶ Resolved (facts + params) ──open_engine──▶ Engine
                                   offload layers, memory check, load, overflow hint

Commands and library functions resolve a spec once and pass the Resolved on; the engine only
loads and runs, and the memory check and the preset search stay out of it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PresetError, ResourceError
from .gguf_meta import ModelFacts, read_facts
from .memory import SCORE, Workload, check_memory
from .params import C_INT_MAX, DEVICES, KV_CACHE_TYPES, MAX_CTX, MIN_CTX, GpuLayers, RuntimeParams
from .paths import resolve_model_path
from .presets import ROPE_METHODS, Ladder, load_preset, resolve_ladder, suggest_preset

if TYPE_CHECKING:  # llama_cpp is slow to import, and only loading a model needs it
    from .engine import Engine

DEFAULT_PRESET = "native"


@dataclass(frozen=True)
class RunSpec:
    """What a user asked for, before anything is loaded: a model, a preset and how to run it."""

    model: str | Path | None = None  # None: the default model; a path, or a name in the models directory
    preset: str = DEFAULT_PRESET  # a preset name or a .toml path
    ctx: int | None = None  # overrides the preset's target context
    cache_type: str | None = None  # overrides the preset's KV cache type (K and V)
    flash_attn: bool | None = None  # overrides the preset's flash attention setting
    swa_full: bool | None = None  # overrides the preset's sliding-window cache setting
    device: str = "auto"  # auto | cpu | cuda | metal
    gpu_layers: GpuLayers = None  # a count, "all", or None (all when a GPU is usable)
    threads: int | None = None  # None: every core this process may use
    force: bool = False  # load even when the memory estimate exceeds what is available
    verbose: bool = False  # llama.cpp's own log on stderr
    kv_cache: bool = True  # save and restore KV snapshots of long documents (see kvcache)

    def __post_init__(self) -> None:
        # Every number here reaches a C integer in llama.cpp, which would wrap an out-of-range value.
        if self.ctx is not None and not _is_int(self.ctx, MIN_CTX, MAX_CTX):
            raise PresetError(f"ctx must be a number of tokens from {MIN_CTX} to {MAX_CTX:,}, not {self.ctx!r}.")
        if self.threads is not None and not _is_int(self.threads, 1, C_INT_MAX):
            raise ResourceError(f"threads must be a number from 1 to {C_INT_MAX:,}, not {self.threads!r}.")
        if self.device not in DEVICES:
            raise ResourceError(f"Unknown device {self.device!r}: use one of {', '.join(DEVICES)}.")
        if self.cache_type is not None and self.cache_type not in KV_CACHE_TYPES:
            raise ResourceError(f"Unknown KV cache type {self.cache_type!r}: use one of {', '.join(KV_CACHE_TYPES)}.")
        layers = self.gpu_layers
        if not (layers is None or layers == "all" or _is_int(layers, 0, C_INT_MAX)):
            raise ResourceError(f"gpu_layers must be a number of layers (0 to {C_INT_MAX:,}), 'all' or None, "
                                f"not {layers!r}.")


def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


@dataclass(frozen=True)
class Resolved:
    """A spec resolved against its model: the facts read from the GGUF header and the exact
    llama.cpp parameters of every window it may run at (one for a static preset, a ladder for
    `auto`). Resolved once, then passed to whatever loads or records it."""

    spec: RunSpec
    facts: ModelFacts
    ladder: Ladder

    @property
    def params(self) -> RuntimeParams:
        """The largest window's parameters: what memory is planned for (the only ones, static)."""
        return self.ladder.top

    def params_for(self, needed: int) -> RuntimeParams:
        """The parameters a request of `needed` tokens (prompt and answer) runs with."""
        return self.ladder.step_for(needed)

    def with_preset(self, preset: str) -> Resolved:
        """The same model and run options under another preset (the facts are not read again)."""
        spec = replace(self.spec, preset=preset)
        return Resolved(spec, self.facts, _ladder(spec, self.facts))


def model_facts(model: str | Path | None) -> ModelFacts:
    return read_facts(resolve_model_path(model))


def resolve_spec(spec: RunSpec) -> Resolved:
    facts = model_facts(spec.model)
    return Resolved(spec, facts, _ladder(spec, facts))


def _ladder(spec: RunSpec, facts: ModelFacts) -> Ladder:
    def overrides(params: RuntimeParams) -> RuntimeParams:
        if spec.cache_type:
            # llama.cpp quantizes the V cache only with flash attention.
            params = replace(params, type_k=spec.cache_type, type_v=spec.cache_type,
                             flash_attn=True if spec.cache_type != "f16" else params.flash_attn)
        if spec.flash_attn is not None:
            params = replace(params, flash_attn=spec.flash_attn)
        if spec.swa_full is not None:
            params = replace(params, swa_full=spec.swa_full)
        return params

    return resolve_ladder(load_preset(spec.preset), facts, ctx=spec.ctx).map(overrides)


def open_engine(target: RunSpec | Resolved, seed: int = 0, *, workload: Workload = SCORE) -> Engine:
    """Resolve (unless already resolved), choose the offload, check memory for the workload (its
    sequences, each at the largest window, and the logits it reads), load at the smallest (an
    adaptive engine grows its window per request). The engine is built complete: ladder, snapshot
    store, overflow hint and `workload.n_seq` sequences per context."""
    from .engine import Engine, offload_layers
    from .kvcache import KVStore, snapshot_threshold

    resolved = target if isinstance(target, Resolved) else resolve_spec(target)
    check_runnable(resolved)
    spec, facts = resolved.spec, resolved.facts
    store = KVStore() if spec.kv_cache else None
    # A malformed LOCALCTX_KV_CACHE_* is an error now, not mid-answer (the threshold also decides,
    # without snapshots, where a document prompt is split).
    if store is not None:
        store.check()
    else:
        snapshot_threshold()
    gpu_layers = offload_layers(spec.device, spec.gpu_layers)
    ladder = planned_ladder(resolved, gpu_layers, workload=workload)
    return Engine.load(facts, ladder, gpu_layers=gpu_layers, threads=spec.threads, verbose=spec.verbose, seed=seed,
                       workload=workload, kv_store=store, overflow_hint=lambda needed: suggest_preset(facts, needed))


def check_runnable(resolved: Resolved) -> None:
    """Refuse what llama.cpp cannot run from context parameters: a preset's per-dimension RoPE
    factors, and RoPE rescaled on top of factors a conversion baked into the file."""
    facts, steps, top = resolved.facts, resolved.ladder.steps, resolved.ladder.top
    if any(step.rope_freqs for step in steps):
        raise PresetError(
            f"Preset {top.preset!r} sets per-dimension RoPE factors ([rope_freqs]), which llama.cpp reads only from "
            "a GGUF's rope_freqs.weight tensor: no runtime setting applies them. Bake them first with "
            f"`localctx convert {facts.path.name} OUT.gguf --preset {resolved.spec.preset}`, then run OUT.gguf with "
            "--preset native (add --ctx N for a window past the trained one)."
        )
    prov = facts.provenance
    if prov is not None and prov.baked_freqs and any(step.method in ROPE_METHODS for step in steps):
        raise PresetError(
            f"{facts.path.name} carries per-dimension RoPE factors baked in by `localctx convert` (preset "
            f"{prov.preset}), and preset {top.preset!r} would rescale RoPE on top of them. Run it with --preset "
            f"native (add --ctx N for a window past the trained one), or run the original file with {top.preset!r}."
        )


def planned_ladder(resolved: Resolved, gpu_layers: int, available: Callable[[], int] | None = None,
                   workload: Workload = SCORE) -> Ladder:
    """The ladder memory allows for `workload` (default: scoring, the most logits a context returns;
    with n_seq sequences each step's window is per sequence, in one unified KV cache of n_seq x
    window cells). An explicit window that does not fit is refused (unless --force); auto's default
    maximum is lowered to the largest step that fits, and says so in its notes."""
    from functools import partial

    ladder = resolved.ladder
    check = partial(check_memory, resolved.facts, gpu_layers=gpu_layers, force=resolved.spec.force,
                    available=available, workload=workload)
    try:
        check(ladder.top)
        return ladder
    except ResourceError:
        if not ladder.default_max:
            raise
        for i in reversed(range(len(ladder.steps) - 1)):
            step = ladder.steps[i]
            try:
                check(step)
            except ResourceError:
                continue
            note = (f"auto's default maximum {ladder.top.n_ctx:,} does not fit in memory: "
                    f"lowered to {step.n_ctx:,} (pass --ctx N to choose)")
            return Ladder(ladder.steps[:i] + (replace(step, notes=step.notes + (note,)),), True)
        raise
