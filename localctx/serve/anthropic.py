"""Anthropic's Messages API (`POST /v1/messages`) on the same core as chat completions: a request
is translated into an OpenAI chat body and validated by protocol.parse_chat (so both APIs take the
same rules), and the outcome is written back in Anthropic's shapes: content blocks (text,
tool_use), stop_reason, usage, its server-sent events, and its error object.

Translation: `system` becomes a system message; a user turn's tool_result blocks become `tool`
messages (before its text, since they answer the previous turn); an assistant turn's tool_use
blocks become `tool_calls`; tools' `input_schema` is their `parameters`; tool_choice auto, any,
tool and none are OpenAI's auto, required, a named function and none.
"""
from __future__ import annotations

import json
import secrets
from typing import Any

from .protocol import ApiError, ApiRequest, Outcome, parse_chat

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large", 500: "api_error",
               503: "overloaded_error"}
# Fields that would change the answer: refused, never ignored.
REFUSED = ("top_k", "thinking", "container", "mcp_servers", "output_config")


def error_body(err: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}


# --- requests -------------------------------------------------------------------------------


def parse_messages(body: Any) -> ApiRequest:
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    for name in REFUSED:
        if body.get(name) is not None and body.get(name) != {"type": "disabled"}:
            raise ApiError(f"'{name}' is not supported.", param=name, code="unsupported_parameter")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise ApiError("'max_tokens' is required.", param="max_tokens")
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= 1:
        raise ApiError(f"'temperature' must be from 0 to 1, not {temperature}.", param="temperature")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError("'stop_sequences' must be a list of non-empty strings.", param="stop_sequences")
    chat = {"model": body.get("model"), "messages": _system(body.get("system")) + _turns(body.get("messages")),
            "max_tokens": max_tokens, "temperature": temperature, "top_p": body.get("top_p"),
            "stop": stops or None, "stream": body.get("stream"), **_tools(body)}
    return parse_chat(chat)


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None or value == "" or value == []:
        return []
    return [{"role": "system", "content": _text(value, "system")}]


def _text(value: Any, param: str) -> str:
    """A string, or a list of text blocks (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise ApiError(f"'{param}[{j}]' must be a text block: this server handles text only.",
                               param=f"{param}[{j}]")
            parts.append(block["text"])
        return "".join(parts)
    raise ApiError(f"'{param}' must be a string or a list of text blocks.", param=param)


def _turns(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError("'messages' must be a non-empty list of {role, content}.", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(f"'{param}.role' must be 'user' or 'assistant'.", param=f"{param}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
        elif isinstance(content, list):
            out += _blocks(m["role"], content, f"{param}.content")
        else:
            raise ApiError(f"'{param}.content' must be a string or a list of content blocks.",
                           param=f"{param}.content")
    return out


def _blocks(role: str, blocks: list[Any], param: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        p = f"{param}[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not isinstance(
                    b.get("input"), dict):
                raise ApiError(f"'{p}' must be a tool_use block with id, name and an input object.", param=p)
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(b.get("tool_use_id"), str):
                raise ApiError(f"'{p}.tool_use_id' is required.", param=f"{p}.tool_use_id")
            text = _text(b.get("content") or "", f"{p}.content")
            results.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": f"Error: {text}" if b.get("is_error") else text})
        else:
            raise ApiError(f"'{p}' must be a text block{', a tool_use block' if role == 'assistant' else ''}"
                           f"{', a tool_result block' if role == 'user' else ''}: this server handles text only.",
                           param=p)
    out = results
    if calls:
        out.append({"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls})
    elif texts or not results:
        out.append({"role": role, "content": "".join(texts)})
    return out


def _tools(body: dict[str, Any]) -> dict[str, Any]:
    tools, choice = body.get("tools"), body.get("tool_choice")
    out: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise ApiError("'tools' must be a list.", param="tools")
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            raise ApiError("'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}.",
                           param="tool_choice")
        kind = choice["type"]
        out["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}} if kind == "tool"
                              else {"any": "required"}.get(kind, kind))
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def _tool(t: Any, param: str) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
        raise ApiError(f"'{param}' must be a custom tool {{name, description, input_schema}}: server tools "
                       "are not supported.", param=param)
    if "input_schema" not in t:
        raise ApiError(f"'{param}.input_schema' is required.", param=f"{param}.input_schema")
    return {"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                             "parameters": t["input_schema"]}}


# --- responses ------------------------------------------------------------------------------


def _tool_use(call: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": call.arguments}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data}, ensure_ascii=False)}\n\n"


class MessageShapes:
    """One response in Anthropic's shapes: the message, or its stream of events."""

    def __init__(self, request: ApiRequest, model: str) -> None:
        self.request, self.model = request, model
        self.id = "msg_" + secrets.token_hex(12)
        self.block = -1  # the index of the content block the stream has open
        self.text_open = False

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None, usage: dict[str, int]) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}

    @staticmethod
    def _usage(out: Outcome) -> dict[str, int]:
        return {"input_tokens": out.prompt_tokens, "output_tokens": out.completion_tokens}

    def complete(self, out: Outcome) -> dict[str, Any]:
        content = [{"type": "text", "text": out.text}] if out.text or not out.tool_calls else []
        content += [_tool_use(c) for c in out.tool_calls]
        return {**self._message(content, STOP_REASONS.get(out.finish_reason, "end_turn"), self._usage(out)),
                "localctx": out.details}

    def sse_open(self) -> list[str]:
        return [_sse("message_start", {"message": self._message([], None, {"input_tokens": 0, "output_tokens": 0})})]

    def sse_text(self, text: str, logprobs: Any = None) -> list[str]:  # no logprobs in Anthropic's API
        events = []
        if not self.text_open:
            self.block += 1
            self.text_open = True
            events.append(_sse("content_block_start", {"index": self.block,
                                                       "content_block": {"type": "text", "text": ""}}))
        return events + [_sse("content_block_delta", {"index": self.block, "delta": {"type": "text_delta",
                                                                                     "text": text}})]

    def sse_done(self, out: Outcome) -> list[str]:
        events = self.sse_text(out.held) if out.held or (self.block < 0 and not out.tool_calls) else []
        if self.text_open:
            events.append(_sse("content_block_stop", {"index": self.block}))
            self.text_open = False
        for call in out.tool_calls:
            self.block += 1
            args = json.dumps(call.arguments, ensure_ascii=False)
            events += [_sse("content_block_start", {"index": self.block,
                                                    "content_block": {**_tool_use(call), "input": {}}}),
                       _sse("content_block_delta", {"index": self.block,
                                                    "delta": {"type": "input_json_delta", "partial_json": args}}),
                       _sse("content_block_stop", {"index": self.block})]
        stop = STOP_REASONS.get(out.finish_reason, "end_turn")
        return events + [_sse("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                                "usage": self._usage(out), "localctx": out.details}),
                         _sse("message_stop", {})]

    def sse_error(self, err: ApiError) -> list[str]:
        return [_sse("error", {"error": error_body(err)["error"]})]
