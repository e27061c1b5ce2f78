"""The OpenAI wire format: request bodies validated into plain dataclasses, and the response,
chunk and error objects built from results. Pure functions of JSON-like data: nothing here
touches the model or the network, so every rule can be read (and tested) in one place.

Validation is strict on the fields localctx acts on (a wrong type or range is a 400 naming the
field) and refuses features it does not implement (n > 1, tools, echo) rather than ignoring them
(penalties, logit_bias, logprobs and response_format are validated in structured.py); fields it
has no use for (`user`, `metadata`, vendor extras) are ignored, as clients send many of them.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..params import MAX_SEED
from .logprobs import Entry, chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from .tools import ToolRequest

DEFAULT_MAX_TOKENS = 512  # when a request omits max_tokens (capped to the room left in the window)
MAX_STOP = 4  # as the OpenAI API
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    """A request the API refuses: HTTP status and the OpenAI error object's fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, or less when the window has less room
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias
    logprobs: int | None = None  # alternatives per token (0: only the token's own); None: no logprobs
    grammar: str | None = None  # GBNF from response_format


@dataclass(frozen=True)
class ApiRequest:
    """A validated chat or completions request. `messages` for chat, `prompt` for completions."""

    kind: str  # "chat" | "completion"
    model: str | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    tools: ToolRequest | None = None  # chat: the tools offered (serve/tools.py)


def parse_chat(body: Any) -> ApiRequest:
    from .tools import parse_tools  # tools.py builds on this module's ApiError
    body = _object(body)
    messages = _messages(body.get("messages"))
    _unsupported(body, chat=True)
    return ApiRequest("chat", _model(body), _sampling(body, chat=True), *_stream(body), messages=messages,
                      tools=parse_tools(body))


def parse_completion(body: Any) -> ApiRequest:
    body = _object(body)
    prompt = _prompt(body.get("prompt"))
    _unsupported(body, chat=False)
    return ApiRequest("completion", _model(body), _sampling(body, chat=False), *_stream(body), prompt=prompt)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(f"The request body must be a JSON object, not {_kind(body)}.")
    return body


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _wrong(param: str, wanted: str, value: Any) -> ApiError:
    return ApiError(f"'{param}' must be {wanted}, not {_kind(value)}.", param=param, code="invalid_type")


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _wrong("model", "a string", model)
    return model


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    from .tools import tool_message
    if value is None:
        raise ApiError("'messages' is required: a list of {role, content} objects.", param="messages")
    if not isinstance(value, list):
        raise _wrong("messages", "an array", value)
    if not value:
        raise ApiError("'messages' is empty: give at least one message.", param="messages", code="empty_array")
    out, called = [], {}  # called: the ids of the tool calls so far, to name the function a result answers
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong(param, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(f"'{param}.role' must be one of {', '.join(ROLES)}, not {role!r}.", param=f"{param}.role")
        if m.get("function_call"):
            raise ApiError(f"'{param}.function_call' (the deprecated form) is not supported: use 'tool_calls'.",
                           param=param)
        if (role == "assistant" and m.get("tool_calls")) or role == "tool":
            # A call's content may be null; the template reads "" as no text.
            content = _content(m.get("content") or "", f"{param}.content")
            out.append(tool_message(m, param, content, called))
            continue
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{param}.content")})
    if all(m["role"] == "system" for m in out):
        raise ApiError("'messages' needs a user or assistant message, not only system messages.", param="messages")
    return tuple(out)


def _content(value: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (joined); images and audio are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}: "
                               "this server handles text only.", param=f"{param}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong(param, "a string or a list of text parts", value)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if value is None:
        raise ApiError("'prompt' is required: a string.", param="prompt")
    if not isinstance(value, str):
        raise ApiError("'prompt' must be a string (or a list of exactly one string): batches and token "
                       f"arrays are not supported, not {_kind(value)}.", param="prompt", code="invalid_type")
    if not value:
        raise ApiError("'prompt' is empty.", param="prompt")
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(name, "a number", value)
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"above {lo:g}" if lo_open else f"from {lo:g}"
        raise ApiError(f"'{name}' must be {low} to {hi:g}, not {value}.", param=name, code="invalid_value")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if not lo <= value <= hi:
        raise ApiError(f"'{name}' must be from {lo:,} to {hi:,}, not {value:,}.", param=name, code="invalid_value")
    return value


def _sampling(body: dict[str, Any], *, chat: bool) -> Sampling:
    from . import structured  # imported here: it builds on this module's validators

    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:  # chat: max_completion_tokens (the current name) wins over max_tokens
        value = _integer(body, name, 1, 2**31 - 1)
        if value is not None and max_tokens is None:
            max_tokens = value
    n = _integer(body, "n", 1, 2**31 - 1)
    if n is not None and n != 1:
        raise ApiError(f"'n' must be 1: one model serves one completion per request, not {n}.", param="n",
                       code="invalid_value")
    frequency_penalty, presence_penalty = structured.penalties(body)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", 0, MAX_SEED),
        stop=_stop(body.get("stop")),
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=structured.logit_bias(body),
        logprobs=structured.logprobs(body, chat=chat),
        grammar=structured.response_format(body),
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOP:
        raise ApiError(f"'stop' takes at most {MAX_STOP} strings, not {len(stops)}.", param="stop",
                       code="invalid_value")
    if any(not s for s in stops):
        raise ApiError("'stop' strings must not be empty.", param="stop", code="invalid_value")
    return tuple(stops)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    if not stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _wrong("stream_options.include_usage", "a boolean", usage)
    return True, bool(usage)


def _unsupported(body: dict[str, Any], *, chat: bool) -> None:
    """Features that would change the answer and are not implemented: refused, never ignored."""
    if chat:
        return
    if body.get("echo"):
        raise ApiError("'echo' is not supported.", param="echo", code="unsupported_parameter")
    if body.get("suffix"):
        raise ApiError("'suffix' is not supported.", param="suffix", code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise ApiError("'best_of' must be 1.", param="best_of", code="unsupported_parameter")


# --- responses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a finished request produced: counts for `usage`, and localctx's own facts about the run."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    details: dict[str, Any]
    tool_calls: tuple[Any, ...] = ()  # tools.Call: then `text` is the text outside the calls
    held: str = ""  # text a stream withheld while it could have been a call, and that was not one
    cached_tokens: int = 0  # prompt tokens not evaluated again: kept in the sequence's cells or restored
    logprobs: list[Entry] | None = None  # when asked: one entry per generated token

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


class Shapes:
    """The objects of one response (non-streamed, or each chunk of a stream), under one id."""

    def __init__(self, request: ApiRequest, model: str) -> None:
        self.request, self.model = request, model
        self.id, self.created = new_id(request.kind), int(time.time())
        self.chat = request.kind == "chat"
        self.offset = len(request.prompt)  # completions' text_offset: where the next token starts

    def _logprobs(self, items: list[Entry] | None) -> dict[str, Any] | None:
        if items is None or self.request.sampling.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(items)
        shaped = completion_logprobs(items, self.offset)
        self.offset += sum(len(e.token) for e in items)
        return shaped

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, out: Outcome) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            if out.tool_calls:
                message = {"role": "assistant", "content": out.text or None,
                           "tool_calls": [c.openai() for c in out.tool_calls]}
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(out.logprobs),
                      "finish_reason": out.finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": out.text, "logprobs": self._logprobs(out.logprobs),
                      "finish_reason": out.finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": out.usage(), "localctx": out.details}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False,
              logprobs: list[Entry] | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
            obj = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": self._logprobs(logprobs),
                      "finish_reason": finish_reason}
            obj = self._head("text_completion")
        obj["choices"] = [choice]
        if self.request.include_usage:
            obj["usage"] = None  # as OpenAI: every chunk carries the key, the last one the counts
        return obj

    def tool_chunks(self, out: Outcome) -> list[dict[str, Any]]:
        """A stream's calls as OpenAI sends them: per call a chunk with its index, id and name, then
        one with its arguments. They are sent once the answer is complete and checked."""
        chunks = []
        for i, call in enumerate(out.tool_calls):
            head = call.openai(index=i)
            args = head["function"]["arguments"]
            head["function"]["arguments"] = ""
            for delta in (head, {"index": i, "function": {"arguments": args}}):
                chunk = self.chunk(None)
                chunk["choices"][0]["delta"] = {"tool_calls": [delta]}
                chunks.append(chunk)
        return chunks

    def usage_chunk(self, out: Outcome) -> dict[str, Any]:
        obj = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**obj, "choices": [], "usage": out.usage()}

    # Server-sent events, as the app writes them (anthropic.MessageShapes has the same methods).

    def sse_open(self) -> list[str]:
        return [_sse(self.chunk(None, first=True))]

    def sse_text(self, text: str, logprobs: list[Entry] | None = None) -> list[str]:
        return [_sse(self.chunk(text, logprobs=logprobs))]

    def sse_done(self, out: Outcome) -> list[str]:
        """What is left of the text (withheld while it could have been a call), the calls, the
        finish reason, the usage when asked, then [DONE]."""
        chunks = [self.chunk(out.held)] if out.held else []
        chunks += self.tool_chunks(out)
        chunks.append({**self.chunk(None, out.finish_reason), "localctx": out.details})
        if self.request.include_usage:
            chunks.append(self.usage_chunk(out))
        return [_sse(c) for c in chunks] + ["data: [DONE]\n\n"]

    def sse_error(self, err: ApiError) -> list[str]:
        return [_sse(err.body())]


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
