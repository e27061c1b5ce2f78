"""The one path every command takes: model path → facts → preset resolved → engine."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .gguf_meta import ModelFacts, read_facts
from .paths import resolve_model_path
from .presets import RuntimeParams, load_preset, resolve

DEFAULT_PRESET = "native"


@dataclass(frozen=True)
class RunSpec:
    """What a user asked for on the command line, before anything is loaded."""

    model: str | None = None
    preset: str = DEFAULT_PRESET
    ctx: int | None = None
    cache_type: str | None = None  # overrides the preset's KV cache type (K and V)
    flash_attn: bool | None = None
    device: str = "auto"
    gpu_layers: str | None = None
    threads: int | None = None
    force: bool = False
    verbose: bool = False


def model_facts(model: str | Path | None) -> ModelFacts:
    return read_facts(resolve_model_path(model))


def resolve_spec(spec: RunSpec) -> tuple[ModelFacts, RuntimeParams]:
    facts = model_facts(spec.model)
    params = resolve(load_preset(spec.preset), facts, ctx=spec.ctx)
    if spec.cache_type:
        params = replace(params, type_k=spec.cache_type, type_v=spec.cache_type,
                         flash_attn=True if spec.cache_type != "f16" else params.flash_attn)
    if spec.flash_attn is not None:
        params = replace(params, flash_attn=spec.flash_attn)
    return facts, params


def open_engine(spec: RunSpec, seed: int = 0):  # -> Engine (imported lazily: llama_cpp is slow to import)
    from .engine import Engine, Offload

    facts, params = resolve_spec(spec)
    return Engine.load(facts, params, Offload(spec.device, spec.gpu_layers), threads=spec.threads,
                       verbose=spec.verbose, force=spec.force, seed=seed)
