"""Model reports for `inspect` and `models`: plain data, rendered by the CLI."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from gguf import Keys

from .errors import LocalctxError
from .gguf_meta import ModelFacts, arch_key, read_header
from .memory import sliding_cells
from .params import KV_CACHE_TYPES
from .paths import default_model_path, list_user_models
from .presets import applicable, list_presets
from .rope_freqs import read_factors
from .runtime import model_facts

REPORT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)


def inspect_model(model: str | Path | None) -> dict[str, Any]:
    facts = model_facts(model)
    return model_report(facts)


def model_report(facts: ModelFacts) -> dict[str, Any]:
    return {
        "path": str(facts.path),
        "file_size": facts.file_size,
        "architecture": facts.architecture,
        "name": facts.name,
        "quantization": facts.quantization,
        "positions": facts.positions,
        "context_length": facts.context_length,
        "trained_context": facts.trained_context,
        "rope_freq_base": facts.rope_freq_base,
        "rope_dimension_count": facts.rope_dims,
        "rope_scaling": asdict(facts.scaling) if facts.scaling else None,
        "converted_by_localctx": asdict(facts.provenance) if facts.provenance else None,
        "rope_freqs": _rope_factors(facts),
        "layers": facts.n_layers,
        "attention_heads": facts.n_heads,
        "kv_heads": facts.n_heads_kv,
        "head_dim": facts.head_dim_k,
        "kv_cache_bytes_per_token": {t: facts.kv_cache_bytes(1, t) for t in KV_CACHE_TYPES},
        "kv_cache_bytes": {
            str(n): {t: facts.kv_cache_bytes(n, t, sliding_cells=sliding_cells(facts, n)) for t in KV_CACHE_TYPES}
            for n in REPORT_CONTEXTS
        },
        "sliding_window": _sliding(facts),
        "presets": {p.name: _applies(p, facts) for p in list_presets()},
    }


def _rope_factors(facts: ModelFacts) -> dict[str, Any] | None:
    """Per-dimension RoPE factors the file carries (rope_freqs.weight: Llama 3.1's own, or baked by
    convert), which change every position's rotation without any rope.scaling key saying so."""
    header = read_header(facts.path)
    factors = read_factors(header, None)
    if factors is None:
        return None
    attn = header.get(arch_key(Keys.Rope.SCALING_ATTN_FACTOR, facts.architecture))
    return {"count": len(factors), "min": min(factors), "max": max(factors), "factors": list(factors),
            "attn_factor": attn if isinstance(attn, float) else None}


def _sliding(facts: ModelFacts) -> dict[str, Any] | None:
    """Sliding-window layers: which, over how many tokens, and the KV cache with the full-size
    sliding cache (`--swa-full`) beside the window-sized one of `kv_cache_bytes`."""
    if not facts.sliding_window:
        return None
    return {
        "tokens": facts.sliding_window,
        "kind": facts.sliding_kind,
        "layers": [i for i, s in enumerate(facts.sliding_layers) if s],
        "kv_cache_bytes_swa_full": {str(n): {t: facts.kv_cache_bytes(n, t) for t in KV_CACHE_TYPES}
                                    for n in REPORT_CONTEXTS},
    }


def _applies(preset: Any, facts: ModelFacts) -> dict[str, Any]:
    ok, detail = applicable(preset, facts)
    return {"applies": ok, "detail": detail}


def list_models() -> list[dict[str, Any]]:
    """The default model and every GGUF in the user's models directory."""
    rows = []
    try:
        rows.append(_row(default_model_path(), default=True))
    except LocalctxError as exc:  # the default model may be missing: still list the others
        rows.append({"path": None, "default": True, "error": str(exc)})
    rows += [_row(path, default=False) for path in list_user_models()]
    return rows


def _row(path: Path, default: bool) -> dict[str, Any]:
    try:
        facts = model_facts(path)
    except LocalctxError as exc:
        return {"path": str(path), "default": default, "error": str(exc)}
    return {"path": str(path), "default": default, "name": facts.name, "architecture": facts.architecture,
            "quantization": facts.quantization, "trained_context": facts.trained_context,
            "context_length": facts.context_length, "file_size": facts.file_size}
