"""Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (one object per
token, with `top_logprobs`) and the legacy completions object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`). The values come from the model's raw distribution
(engine.logprobs); the worker turns token ids into their text on the model thread."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.logprobs import TokenLogprob


@dataclass(frozen=True)
class Entry:
    """One generated token as the client sees it: its text and bytes, its log-probability, and
    the alternatives (text, bytes, log-probability), most likely first."""

    token: str
    data: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


def entries(picks: Sequence[TokenLogprob], piece: Callable[[int], bytes]) -> list[Entry]:
    def text(token: int) -> tuple[str, bytes]:
        data = piece(token)
        return data.decode("utf-8", errors="replace"), data

    return [Entry(*text(p.token), p.logprob, tuple((*text(t), lp) for t, lp in p.top)) for p in picks]


def chat_logprobs(items: Sequence[Entry]) -> dict[str, Any]:
    def one(token: str, data: bytes, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**one(e.token, e.data, e.logprob), "top_logprobs": [one(*t) for t in e.top]}
                        for e in items], "refusal": None}


def completion_logprobs(items: Sequence[Entry], offset: int) -> dict[str, Any]:
    """`offset`: where the first token starts in prompt + completion text (as OpenAI counts)."""
    offsets = []
    for e in items:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in items], "token_logprobs": [e.logprob for e in items],
            "top_logprobs": [{t: lp for t, _, lp in e.top} for e in items], "text_offset": offsets}
