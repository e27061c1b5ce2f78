"""The request fields that steer sampling beyond temperature and top_p: penalties, `logit_bias`,
`logprobs` and `response_format` (JSON, or JSON that a schema accepts, enforced by a llama.cpp
grammar). Each is validated into what Engine.start takes, or refused with a 400 naming the field;
a schema part the grammar cannot enforce is refused, never ignored (engine.grammar)."""
from __future__ import annotations

import re
from typing import Any

from ..engine.grammar import SchemaError, json_object_grammar, json_schema_grammar
from .protocol import ApiError, _integer, _kind, _number, _wrong

PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2 to 2
MAX_BIAS = 100.0  # OpenAI's range for a logit bias: -100 (banned) to 100 (forced)
TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits for top_logprobs / logprobs
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def penalties(body: dict[str, Any]) -> tuple[float, float]:
    """(frequency_penalty, presence_penalty), as llama.cpp's penalties sampler applies them."""
    return (_number(body, "frequency_penalty", 0.0, -PENALTY, PENALTY),
            _number(body, "presence_penalty", 0.0, -PENALTY, PENALTY))


def logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """Token id -> bias. JSON keys are strings, so ids come as "123" (whether each is in the
    model's vocabulary is checked when the request starts)."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong("logit_bias", "an object of token ids to numbers", value)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not re.fullmatch(r"\d{1,10}", key):
            raise ApiError(f"'logit_bias' keys must be token ids (non-negative integers as strings), not {key!r}.",
                           param="logit_bias", code="invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _wrong(f"logit_bias.{key}", "a number", bias)
        if not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ApiError(f"'logit_bias.{key}' must be from -100 to 100, not {bias}.", param="logit_bias",
                           code="invalid_value")
        out[int(key)] = float(bias)
    return out


def logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many alternatives to report per token, or None for no logprobs. Chat: `logprobs`
    (a boolean) with `top_logprobs` 0-20; completions: `logprobs` 0-5."""
    if not chat:
        return _integer(body, "logprobs", 0, TOP_LOGPROBS["completion"])
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise _wrong("logprobs", "a boolean", on)
    top = _integer(body, "top_logprobs", 0, TOP_LOGPROBS["chat"])
    if top is not None and not on:
        raise ApiError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    return (top or 0) if on else None


def response_format(body: dict[str, Any]) -> str | None:
    """The GBNF grammar the answer must follow, or None for free text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _wrong("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind != "json_schema":
        raise ApiError(f"'response_format.type' must be text, json_object or json_schema, not {kind!r}.",
                       param="response_format.type", code="invalid_value")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _wrong("response_format.json_schema", "an object with 'name' and 'schema'", spec)
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise ApiError("'response_format.json_schema.name' must be 1 to 64 letters, digits, _ or -.",
                       param="response_format.json_schema.name", code="invalid_value")
    if not isinstance(spec.get("strict", False), bool):
        raise _wrong("response_format.json_schema.strict", "a boolean", spec["strict"])
    schema = spec.get("schema", {})  # as OpenAI: no schema means any JSON object
    if not isinstance(schema, dict):
        raise ApiError(f"'response_format.json_schema.schema' must be an object, not {_kind(schema)}.",
                       param="response_format.json_schema.schema", code="invalid_type")
    try:
        return json_schema_grammar(schema)
    except SchemaError as exc:
        raise ApiError(str(exc), param="response_format.json_schema.schema", code="unsupported_schema") from None
