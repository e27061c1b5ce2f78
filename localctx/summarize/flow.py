"""One document's summary as a flow of model calls: the prompt frame around a body, the plan (one
pass or chunks), the requests of each round (map chunks, groupings, reduce calls) and the record
a finished or failed document gets. Pure: no engine runs here (Frame.render only tokenizes)."""
from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ContextOverflowError, InputError, LocalctxError

# --- Prompts -----------------------------------------------------------------------------------

_BODY = "\x00BODY\x00"


@dataclass(frozen=True)
class Frame:
    """An instruction rendered with the model's chat template around a body. The fixed part
    (system + instruction) comes first, so llama.cpp's prefix matching evaluates it once per batch
    and every chunk after it reuses that KV state."""

    head: list[int]
    tail: list[int]
    stop: list[str]

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.tail)

    @classmethod
    def render(cls, engine: Any, instruction: str) -> Frame:
        # The instruction is repeated after the text: past a few thousand tokens a small model
        # loses an instruction it read only at the start and continues the text instead.
        control = engine.control_tokens_in(instruction)
        if control:  # the instruction is tokenized with the template's text, so it must not carry markup
            raise InputError(f"The summary prompt contains {control[0]!r}, a control token of this model's chat "
                             "template; remove it from --prompt / --prompt-file.")
        content = f"{instruction}\n\nText:\n{_BODY}\n\nEnd of the text. {instruction}"
        prompt = engine.format_chat([{"role": "user", "content": content}])
        head, tail = prompt.text.split(_BODY)
        return cls(engine.tokenize(head, add_bos=False, special=True),
                   engine.tokenize(tail, add_bos=False, special=True), prompt.stop)

    def tokens(self, engine: Any, body: str) -> list[int]:
        # The body is tokenized without special tokens: a document cannot inject chat markup.
        return self.head + engine.tokenize(body, add_bos=False, special=False) + self.tail


def _join_parts(parts: Sequence[str]) -> str:
    return "\n\n".join(f"Part {i}:\n{p.strip()}" for i, p in enumerate(parts, 1))


def group_parts(parts: Sequence[str], count: Callable[[str], int], room: int) -> list[list[str]]:
    """Consecutive partial summaries, as many per reduce call as `room` tokens hold (as joined for
    the call). A part too large to share a call gets one of its own."""
    groups: list[list[str]] = [[]]
    for part in parts:
        candidate = groups[-1] + [part]
        if groups[-1] and count(_join_parts(candidate)) > room:
            groups.append([part])
        else:
            groups[-1] = candidate
    return groups


# --- One document ------------------------------------------------------------------------------


@dataclass
class Plan:
    strategy: str
    tokens: int
    chunks: list[str]


@dataclass(frozen=True)
class Call:
    """One model call of a document's summary: a map chunk (or, `whole`, the document in one
    pass) or a reduce group's joined partial summaries. `doc_tokens`: its share of the document,
    for progress."""

    role: str  # map | reduce
    body: str
    whole: bool = False
    doc_tokens: int = 0


@dataclass(frozen=True)
class Group:
    """Partial summaries to split into reduce calls (counting them needs the tokenizer)."""

    parts: tuple[str, ...]


Request = Call | Group
Flow = Generator[list[Request], list[Any], str]


def run_flow(flow: Flow, answer: Callable[[list[Request]], list[Any]]) -> str:
    """Drive a document's flow to its summary, answering each round of requests with `answer`."""
    try:
        requests = next(flow)
        while True:
            requests = flow.send(_raise_failed(answer(requests)))
    except StopIteration as stop:
        return stop.value


def _raise_failed(answers: list[Any]) -> list[Any]:
    """A round's answers, unless a call failed (its error stands in its place): then that error."""
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    return answers


def summary_flow(plan: Plan) -> Flow:
    """A document's summary as the requests it needs, in rounds: each `yield` hands out requests
    that do not depend on each other (every map chunk of a document; every reduce group of a
    level) and receives their answers. One process answers them in order (`Summarizer.summarize`);
    a cluster's driver answers them in parallel. Either way the same calls."""
    if plan.strategy == "stuff":
        [summary] = yield [Call("map", plan.chunks[0], whole=True, doc_tokens=plan.tokens)]
        return summary
    share = plan.tokens // len(plan.chunks)  # progress measured in document tokens
    parts = yield [Call("map", chunk, doc_tokens=share) for chunk in plan.chunks]
    while len(parts) > 1:
        [groups] = yield [Group(tuple(parts))]
        if len(groups) == len(parts):  # cannot happen while reduce_room >= 2 answers; guard anyway
            raise ContextOverflowError("Partial summaries do not shrink enough to combine; use a larger preset.")
        parts = yield [Call("reduce", _join_parts(g)) for g in groups]
    return parts[0]


def document_result(plan: Plan, calls: list[dict[str, Any]], summary: str, seconds: float) -> dict[str, Any]:
    """A finished document's record fields, from its calls (run or cached) and its summary."""
    if not summary.strip():
        raise LocalctxError("the model returned an empty summary.")
    return {"status": "ok", "strategy": plan.strategy, "tokens": plan.tokens, "chunks": len(plan.chunks),
            "model_calls": len(calls), "windows": [c.get("window") for c in calls],
            "seconds": round(seconds, 2), "summary": summary.strip(), "error": None}


def failed_result(plan: Plan | None, message: str) -> dict[str, Any]:
    return {"status": "failed", "strategy": plan.strategy if plan else None,
            "tokens": plan.tokens if plan else None, "chunks": len(plan.chunks) if plan else None,
            "model_calls": 0, "seconds": 0.0, "summary": None, "error": message}


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LocalctxError) else f"{type(exc).__name__}: {exc}"
