"""One-shot generation: a prompt (and optionally a document) through the engine."""
from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    document_end: int | None  # how many leading tokens are the document (shared by any question on it)


def build_prompt(engine: Engine, req: GenerateRequest) -> Prompt:
    """The prompt's tokens, the document first. The prompt, system prompt and document are data:
    only the chat template's own text yields control tokens (see Engine.chat_tokens)."""
    if req.document is None:
        return Prompt(_tokens(engine, req, req.prompt), None)
    doc = read_text(req.document)
    if not req.prompt:
        return Prompt(_tokens(engine, req, doc), None)
    tokens = _tokens(engine, req, f"{doc}\n\n{req.prompt}")
    # The document's end: what the prompt shares with the document alone (the last token or two of
    # the document may merge with what follows it, and then belong to the question).
    return Prompt(tokens, common_prefix(tokens, _tokens(engine, req, doc)))


def build_prompt_tokens(engine: Engine, req: GenerateRequest) -> list[int]:
    return build_prompt(engine, req).tokens


def _tokens(engine: Engine, req: GenerateRequest, text: str) -> list[int]:
    if req.chat:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": text}]
        return engine.chat_tokens(messages)
    return engine.tokenize(text, add_bos=True)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate(engine: Engine, req: GenerateRequest) -> Generation:
    """Start streaming; fails up front (nothing truncated) when the prompt does not fit the window.
    A long document is restored from a KV snapshot when one matches (and saved as one when not)."""
    prompt = build_prompt(engine, req)
    engine.check_fits(len(prompt.tokens), req.max_tokens)
    stop = engine.chat_stop if req.chat else []
    return engine.generate(prompt.tokens, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                           stop=stop, document_end=prompt.document_end)


def generation_report(engine: Engine, gen: Generation) -> dict[str, Any]:
    return {
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "model": str(engine.facts.path),
        "timings": gen.timings.to_dict(),
        "params": engine.params.to_dict(),
    }
