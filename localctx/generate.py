"""One-shot generation: a prompt (and optionally a document) through the engine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .documents import read_text
from .engine import Engine, Generation


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    document: Path | None = None
    chat: bool = False
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


def build_prompt_tokens(engine: Engine, req: GenerateRequest) -> list[int]:
    """The prompt's tokens. The prompt, system prompt and document are data: only the chat
    template's own text yields control tokens (see Engine.chat_tokens)."""
    text = req.prompt
    if req.document is not None:
        doc = read_text(req.document)
        text = f"{doc}\n\n{req.prompt}" if req.prompt else doc
    if req.chat:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": text}]
        return engine.chat_tokens(messages)
    return engine.tokenize(text, add_bos=True)


def generate(engine: Engine, req: GenerateRequest) -> Generation:
    """Start streaming; fails up front (nothing truncated) when the prompt does not fit the window."""
    tokens = build_prompt_tokens(engine, req)
    engine.check_fits(len(tokens), req.max_tokens)
    stop = engine.chat_stop if req.chat else []
    return engine.generate(tokens, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed, stop=stop)


def generation_report(engine: Engine, gen: Generation) -> dict[str, Any]:
    return {
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "model": str(engine.facts.path),
        "timings": gen.timings.to_dict(),
        "params": engine.params.to_dict(),
    }
