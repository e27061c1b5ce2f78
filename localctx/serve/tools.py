"""Tool calls (function calling) in OpenAI's shapes: the request's tools and tool messages
validated, rendered into the prompt, and the model's calls parsed back out of its text.

Rendering: a template that uses the Jinja variable `tools` (Hermes/Qwen, Llama 3.x, Mistral and
most current templates) gets them as HuggingFace's `apply_chat_template` passes them
(`[{"type": "function", "function": {...}}]`, and `tool_calls` with `arguments` as an object on
assistant messages). A template without tool syntax gets the generic form: a system message that
lists the tools and asks for a bare JSON object `{"name": ..., "arguments": {...}}`; past calls and
results are written as assistant and user text in that same form.

Parsing: the family is read from the template text (family_of), and each family's parser also
accepts its calls without their marker, since llama.cpp does not print control tokens such as
`<|python_tag|>` or `[TOOL_CALLS]` in the generated text. A call that is malformed, names an
unknown function, or has arguments its schema rejects is never returned as a tool call: the reply
is then the model's plain text (finish_reason "stop").

Pure functions of JSON-like data and text: nothing here touches the model.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from .protocol import ApiError

HERMES, LLAMA3, MISTRAL, GENERIC = "hermes", "llama3", "mistral", "generic"
CHOICES = ("auto", "none", "required")
MAX_TOOLS = 128  # as the OpenAI API
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """As HF templates expect a tool: OpenAI's own shape."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools: `choice` is "auto", "none", "required" or a function's name."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def offered(self) -> tuple[Tool, ...]:
        """The tools the model may call: all of them, or only the one tool_choice names."""
        if self.choice in CHOICES:
            return self.tools if self.choice != "none" else ()
        return tuple(t for t in self.tools if t.name == self.choice)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: dict[str, Any]

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": json.dumps(self.arguments,
                                                                                      ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class Reply:
    """The assistant's answer: its text outside any calls (None when there is none) and the calls."""

    content: str | None
    calls: tuple[Call, ...] = ()


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# --- requests -------------------------------------------------------------------------------


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`, validated; None when there are no tools."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ApiError("'functions' and 'function_call' (the deprecated form) are not supported: use 'tools'.",
                       param="functions", code="unsupported_parameter")
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls", code="invalid_type")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise ApiError("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    if not isinstance(raw, list):
        raise ApiError("'tools' must be an array.", param="tools", code="invalid_type")
    if len(raw) > MAX_TOOLS:
        raise ApiError(f"'tools' takes at most {MAX_TOOLS} tools, not {len(raw)}.", param="tools",
                       code="invalid_value")
    tools = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(raw))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError("'tools' names a function twice.", param="tools", code="invalid_value")
    return ToolRequest(tools, _choice(choice, names), True if parallel is None else parallel)


def _tool(value: Any, param: str) -> Tool:
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(value.get("function"), dict):
        raise ApiError(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}: only function tools "
                       "are supported.", param=param, code="invalid_value")
    fn = value["function"]
    return make_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"{param}.function")


def make_tool(name: Any, description: Any, parameters: Any, param: str, schema_key: str = "parameters") -> Tool:
    """A tool, checked: a name as OpenAI allows, and parameters that are a valid JSON schema."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(f"'{param}.name' must be 1 to 64 letters, digits, '_', '-', '.' or ':'.",
                       param=f"{param}.name", code="invalid_value")
    if description is not None and not isinstance(description, str):
        raise ApiError(f"'{param}.description' must be a string.", param=f"{param}.description", code="invalid_type")
    schema = {"type": "object", "properties": {}} if parameters is None else parameters
    if not isinstance(schema, dict):
        raise ApiError(f"'{param}.{schema_key}' must be a JSON schema object.", param=f"{param}.{schema_key}",
                       code="invalid_type")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ApiError(f"'{param}.{schema_key}' is not a valid JSON schema: {exc.message}.",
                       param=f"{param}.{schema_key}", code="invalid_value") from None
    return Tool(name, description or "", schema)


def _choice(value: Any, names: Sequence[str]) -> str:
    if value is None:
        return "auto"
    if isinstance(value, str) and value in CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name in names:
            return name
        raise ApiError(f"'tool_choice' names {name!r}, which is not in 'tools'.", param="tool_choice",
                       code="invalid_value")
    raise ApiError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}.", param="tool_choice", code="invalid_value")


def tool_message(m: dict[str, Any], param: str, content: str, called: dict[str, str]) -> dict[str, Any]:
    """An assistant message with `tool_calls`, or a `tool` message, as HF templates read them
    (arguments as an object; a tool result with the `name` of the function it answers).
    `called` maps the ids of earlier calls to their functions' names."""
    if m.get("role") == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ApiError(f"'{param}.tool_call_id' is required: the id of the call this message answers.",
                           param=f"{param}.tool_call_id")
        return {"role": "tool", "content": content, "tool_call_id": call_id, "name": called.get(call_id, "")}
    raw = m.get("tool_calls")
    if not isinstance(raw, list) or not raw:
        raise ApiError(f"'{param}.tool_calls' must be a non-empty array.", param=f"{param}.tool_calls",
                       code="invalid_type")
    calls = []
    for j, c in enumerate(raw):
        p = f"{param}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(c.get("id"), str):
            raise ApiError(f"'{p}' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                           "\"arguments\"}}}}.", param=p)
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise ApiError(f"'{p}.function.arguments' must be a JSON object (as a string).",
                           param=f"{p}.function.arguments")
        called[c["id"]] = fn["name"]
        calls.append({"id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return {"role": "assistant", "content": content, "tool_calls": calls}


# --- rendering ------------------------------------------------------------------------------


def family_of(source: str | None) -> str:
    """The tool-call syntax a chat template teaches its model."""
    text = source or ""
    if "<tool_call>" in text:
        return HERMES
    if _MISTRAL_TAG in text:
        return MISTRAL
    if _PYTHON_TAG in text or ("<|start_header_id|>" in text and "tools" in text):
        return LLAMA3
    return GENERIC


def render_input(messages: Sequence[dict[str, Any]], request: ToolRequest | None, source: str | None,
                 variables: frozenset[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` variable to render with the template of this `source`, which
    reads these `variables`. tool_choice "none" renders no tools."""
    offered = request.offered() if request is not None else ()
    if "tools" in variables:
        # A template with tools but no `tool_calls` would drop past calls: they become text.
        out = [m if not m.get("tool_calls") or "tool_calls" in (source or "") else _as_text(m) for m in messages]
        if family_of(source) == MISTRAL:
            out = [_mistral_ids(m) for m in out]
        return out, [t.openai() for t in offered] or None
    out = [_as_text(m) for m in messages]
    if offered:
        out = _with_system(out, generic_instructions(offered, request))
    return out, None


def _mistral_ids(m: dict[str, Any]) -> dict[str, Any]:
    """Mistral's templates refuse call ids that are not 9 letters or digits: each id is written as
    9 hex digits of its hash, the same for a call and the result that answers it."""
    short = lambda i: hashlib.sha256(i.encode()).hexdigest()[:9]  # noqa: E731
    if m.get("tool_calls"):
        return {**m, "tool_calls": [{**c, "id": short(c["id"])} for c in m["tool_calls"]]}
    if m["role"] == "tool":
        return {**m, "tool_call_id": short(m["tool_call_id"])}
    return m


def _as_text(m: dict[str, Any]) -> dict[str, Any]:
    """A tool turn in the generic form, for a template that knows only system, user and assistant."""
    if m["role"] == "tool":
        name = f" {m['name']}" if m.get("name") else ""
        return {"role": "user", "content": f"Result of tool call {m['tool_call_id']}{name}:\n{m['content']}"}
    if m.get("tool_calls"):
        calls = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                     ensure_ascii=False) for c in m["tool_calls"])
        return {"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls}
    return m


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def generic_instructions(tools: Sequence[Tool], request: ToolRequest | None) -> str:
    listing = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in tools)
    must = request is not None and request.choice != "auto"
    how = ("You must call " + (f"the function {tools[0].name}" if len(tools) == 1 and must else "one of them")
           if must else "To call a function")
    return (f"You can call these functions:\n{listing}\n\n{how}, answer with only a JSON object "
            '{"name": <function name>, "arguments": <object of arguments>} and nothing else'
            + ("; for several calls, one such object per line." if request is None or request.parallel else ".")
            + ("" if must else " Otherwise answer normally."))


# --- parsing --------------------------------------------------------------------------------


def parse_reply(text: str, family: str, request: ToolRequest) -> Reply:
    """The calls in `text`, each checked against the offered tools; the plain text when there
    are none, or when any is malformed, unknown or invalid (a broken call is never returned)."""
    found = find_calls(text, family)
    if found is None:
        return Reply(text)
    content, raw = found
    if not raw or (len(raw) > 1 and not request.parallel):
        return Reply(text)
    tools = {t.name: t for t in request.offered()}
    calls = []
    for item in raw:
        call = _checked(item, tools)
        if call is None:
            return Reply(text)
        calls.append(call)
    return Reply(content or None, tuple(calls))


def find_calls(text: str, family: str) -> tuple[str, list[Any]] | None:
    """(text outside the calls, the calls as decoded JSON) in the family's syntax, or None when
    the text holds no call (or one that is not JSON)."""
    if family == HERMES and "<tool_call>" in text:
        items = []
        for body in _HERMES_CALL.findall(text):
            value = _json(body)
            if value is None:
                return None
            items += value if isinstance(value, list) else [value]
        return _HERMES_CALL.sub("", text).strip(), items
    if family == MISTRAL and _MISTRAL_TAG in text:
        before, _, after = text.partition(_MISTRAL_TAG)
        value = _mistral(after)
        return None if value is None else (before.strip(), value)
    stripped = text.strip()
    if stripped.startswith(_PYTHON_TAG):
        stripped = stripped[len(_PYTHON_TAG):].strip()
    value = _whole(stripped)
    return None if value is None else ("", value)


def _mistral(after: str) -> list[Any] | None:
    """`[TOOL_CALLS][{...}]`, or the newer `[TOOL_CALLS]name[ARGS]{...}`."""
    if "[ARGS]" in after:
        items = []
        for part in after.split(_MISTRAL_TAG):
            name, _, args = part.partition("[ARGS]")
            value = _json(args)
            if value is None:
                return None
            items.append({"name": name.strip(), "arguments": value})
        return items
    value = _json(after)
    return None if value is None else value if isinstance(value, list) else [value]


def _whole(text: str) -> list[Any] | None:
    """The whole text as calls: a JSON object, an array of them, or objects one per line or
    separated by ';' (Llama 3.x), optionally in a ```json fence."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    if not text.startswith(("{", "[")):
        return None
    value = _json(text)
    if value is not None:
        return value if isinstance(value, list) else [value]
    items = []
    for part in re.split(r"\s*;\s*|\n+", text):
        value = _json(part) if part.strip() else None
        if not isinstance(value, dict):
            return None
        items.append(value)
    return items or None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _checked(item: Any, tools: dict[str, Tool]) -> Call | None:
    """A decoded call as a Call, or None when it does not fit the offered tools."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        args = _json(args)
    tool = tools.get(item["name"])
    if tool is None or not isinstance(args, dict):
        return None
    try:
        jsonschema.validate(args, tool.parameters)
    except Exception:  # ValidationError, or a $ref that does not resolve: not a call this tool accepts
        return None
    return Call(new_call_id(), tool.name, args)


# --- streaming ------------------------------------------------------------------------------


@dataclass
class StreamGate:
    """Streams the text before a call and withholds the rest: a marker family's text up to its
    marker (and any partial marker at the end), the other families' text unless it opens like a
    call (`{`, `[`, a ``` fence). What is withheld is parsed once the answer is complete."""

    family: str
    held: str = ""
    sent: str = ""
    closed: bool = False  # a call may have started: nothing more is streamed

    def feed(self, text: str) -> str:
        if self.closed:
            self.held += text
            return ""
        self.held += text
        marker = {HERMES: "<tool_call>", MISTRAL: _MISTRAL_TAG}.get(self.family)
        whole = self.sent + self.held
        stripped = whole.lstrip()
        if not stripped:
            return ""
        if not self.sent.strip():
            if stripped.startswith(("{", "[", "```", _PYTHON_TAG)):
                self.closed = True
                return ""
            if "```".startswith(stripped[:3]) or _PYTHON_TAG.startswith(stripped[:len(_PYTHON_TAG)]):
                return ""  # could still open a call: wait for the next piece
        if marker is None:
            return self._release(len(self.held))
        at = self.held.find(marker)
        if at >= 0:
            self.closed = True
            return self._release(at)
        return self._release(len(self.held) - _partial(self.held, marker))

    def _release(self, n: int) -> str:
        out, self.held = self.held[:n], self.held[n:]
        self.sent += out
        return out


def _partial(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


@dataclass
class ToolSession:
    """One request's tools on the worker: the stream gate while it runs, the reply at the end."""

    request: ToolRequest
    family: str
    gate: StreamGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = StreamGate(self.family)

    def feed(self, text: str) -> str:
        return self.gate.feed(text)

    def finish(self, text: str) -> tuple[Reply, str]:
        """The reply, and the text withheld from the stream that is content after all."""
        reply = parse_reply(text, self.family, self.request)
        if reply.calls:
            return reply, ""
        return reply, self.gate.held
