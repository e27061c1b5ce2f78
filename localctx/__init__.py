"""localctx: run GGUF models on llama.cpp beyond the context window they were trained on, and
measure what it costs.

    import localctx

    facts = localctx.read_model_facts()            # the default model: SmolLM2-135M-Instruct
    print(facts.trained_context)                    # 8192
    print(localctx.resolve_preset("yarn-32k").llama_flags())
    with localctx.open_model(preset="yarn-32k") as model:
        print(localctx.generate_text(model, "The capital of France is", max_tokens=8).text)
        chat = localctx.start_chat(model, temperature=0)
        print(chat.ask("What is the capital of Italy?"))

Batches scale out on Ray (`pip install "localctx[ray]"`): `summarize_files`, `evaluate_perplexity`,
`evaluate_passkey` and `evaluate_ruler` take `workers=N` (a local Ray runtime of N worker processes) or
`ray_address="HOST:PORT"` / "auto" (an existing cluster whose nodes see the model file), with the
same results, store and resumability as one process (see docs/distributed.md).

Models: None means the default model; otherwise a GGUF path or a name in the models directory.
Presets: a shipped or user preset name (`localctx presets list`) or a .toml path. Errors are
LocalctxError subclasses whose message says what to do.

The names below load on first use, and llama.cpp is loaded before numpy whenever they do (a CUDA
build segfaulted in its tokenizer when numpy came first), so `import localctx` itself is instant.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

_EXPORTS = {
    # the functions a program calls
    "open_model": "api", "read_model_facts": "api", "resolve_preset": "api", "generate_text": "api",
    "start_chat": "api", "convert_model": "api", "summarize_files": "api", "evaluate_perplexity": "api",
    "evaluate_passkey": "api", "evaluate_ruler": "api", "estimate_memory": "api", "kv_snapshots": "api", "clear_kv_snapshots": "api",
    # what they take and return
    "Engine": "engine", "Generation": "engine", "Timings": "engine", "ChatSession": "chat",
    "ModelFacts": "gguf_meta", "RuntimeParams": "params", "RunSpec": "runtime", "SummarizeOptions": "summarize",
    "BatchResult": "summarize", "ConversionResult": "convert", "EvalResult": "evaluate", "Summary": "evaluate",
    "MemoryEstimate": "memory", "KVStore": "kvcache", "Cluster": "cluster",
    # errors: every one a LocalctxError whose message a user can act on
    "LocalctxError": "errors", "ModelFileError": "errors", "PresetError": "errors", "ResourceError": "errors",
    "ContextOverflowError": "errors", "ConversionError": "errors", "InputError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'localctx' has no attribute {name!r}")
    import_module(".api", __name__)  # loads llama.cpp first, then the rest
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
