"""Tool calls and Anthropic's Messages API through a real `localctx serve` on the default model,
driven by the official `openai` and `anthropic` clients (and raw HTTP for refusals). The model is
tiny: whether it calls a tool is its own choice, so the tests check that whatever it answers is
well formed (a parsed call, or text), and the exact round trips that do not depend on it."""
from __future__ import annotations

import json

import anthropic
import openai
import pytest

from test_serve import KEY, Server, assert_api_error, client, raw, server  # noqa: F401  (fixtures)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
# The default model answers this with JSON that echoes the tool's schema: a stream withholds it as a
# possible call, and it comes back as text (its arguments lack "city", or it is cut off).
ASK = [{"role": "user", "content": "Call get_weather for Paris."}]
ROUND_TRIP = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny, 24 degrees Celsius."},
]


# After one call and its result in the history, the default model calls the other tool itself
# (greedy, recorded: {"name": "get_time", "arguments": {"city": "Rome"}}).
FEW_SHOT = [*ROUND_TRIP, {"role": "assistant", "content": "It is sunny and 24 degrees in Paris."},
            {"role": "user", "content": "Call get_time for Rome."}]


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:  # noqa: F811
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def check_message(choice) -> None:
    """A reply with tools: parsed calls of offered tools with JSON arguments, or plain text."""
    m = choice.message
    if choice.finish_reason == "tool_calls":
        assert m.tool_calls
        for call in m.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert call.function.name in {"get_weather", "get_time"}
            assert isinstance(json.loads(call.function.arguments)["city"], str)
    else:
        assert choice.finish_reason in ("stop", "length") and not m.tool_calls
        assert isinstance(m.content, str)


def test_two_tools_auto_streamed_and_not_agree(client: openai.OpenAI) -> None:  # noqa: F811
    args = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**args)
    check_message(whole.choices[0])
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**args, stream=True):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": None, "arguments": ""})
            entry["name"] = entry["name"] or tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.choices[0].finish_reason
    want = whole.choices[0].message
    if finish != "tool_calls":
        assert want.content.startswith("{")
    assert text == (want.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in want.tool_calls or []]


def test_a_call_the_model_makes_is_parsed_streamed_and_not(client: openai.OpenAI) -> None:  # noqa: F811
    args = dict(model="m", messages=FEW_SHOT, tools=TOOLS, max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    chunks = list(client.chat.completions.create(**args, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # the call's JSON is never streamed as text
    [head, tail] = [tc for d in deltas for tc in d.tool_calls or []]
    assert (head.index, head.function.name, head.function.arguments) == (0, "get_time", "")
    assert head.id.startswith("call_") and tail.index == 0 and json.loads(tail.function.arguments) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and a result go back into the template, and the model answers
    answer = client.chat.completions.create(model="m", tools=TOOLS, max_tokens=12, temperature=0, messages=[
        *FEW_SHOT, whole.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "It is 9 in the evening in Rome."}])
    check_message(answer.choices[0])


def test_a_tool_result_round_trip_renders_and_answers(client: openai.OpenAI) -> None:  # noqa: F811
    ask = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=1, temperature=0)
    answer = client.chat.completions.create(model="m", messages=ROUND_TRIP, tools=TOOLS, max_tokens=24,
                                            temperature=0)
    check_message(answer.choices[0])
    # the call and its result are in the prompt: more tokens than the question with the same tools
    assert answer.usage.prompt_tokens > ask.usage.prompt_tokens + 20
    none = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens < ask.usage.prompt_tokens  # "none" renders no tools


@pytest.mark.parametrize("body,fragment", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "valid JSON schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in 'tools'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}]},
     "JSON object"),
])
def test_bad_tool_requests_get_400(server: Server, body: dict, fragment: str) -> None:  # noqa: F811
    status, reply = raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": ASK, **body}))
    assert_api_error(status, reply, 400, fragment)


# --- /v1/messages -------------------------------------------------------------------------------


def test_messages_plain_and_streamed(claude: anthropic.Anthropic) -> None:
    args = dict(model="m", max_tokens=8, extra_body={"temperature": 0}, system="Answer briefly.",
                messages=[{"role": "user", "content": "What is the capital of France?"}])
    msg = claude.messages.create(**args)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.content[0].type == "text"
    assert msg.usage.input_tokens > 5 and 0 < msg.usage.output_tokens <= 8
    with claude.messages.stream(**args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == msg.content[0].text == final.content[0].text
    assert final.stop_reason == msg.stop_reason and final.usage.output_tokens == msg.usage.output_tokens


def test_messages_tool_result_round_trip(claude: anthropic.Anthropic) -> None:
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    with claude.messages.stream(model="m", max_tokens=24, extra_body={"temperature": 0}, tools=tools,
                                messages=[{"role": "user", "content": ASK[0]["content"]}]) as stream:
        first = stream.get_final_message()  # streamed with tools: withheld text and any calls, accumulated
    uses = [b for b in first.content if b.type == "tool_use"]
    assert (first.stop_reason == "tool_use") == bool(uses)
    for use in uses:
        assert use.name in {"get_weather", "get_time"} and isinstance(use.input["city"], str)
    history = [{"role": "user", "content": ASK[0]["content"]},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": "Paris"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                             "content": "Sunny, 24 degrees Celsius."}]}]
    history += [{"role": "assistant", "content": "It is sunny and 24 degrees in Paris."},
                {"role": "user", "content": "Call get_time for Rome."}]
    third = claude.messages.create(model="m", max_tokens=30, extra_body={"temperature": 0}, tools=tools,
                                   messages=history)
    assert third.stop_reason == "tool_use" and [(b.type, b.name, b.input) for b in third.content] == \
        [("tool_use", "get_time", {"city": "Rome"})]
    assert third.content[0].id.startswith("toolu_") and third.usage.input_tokens > first.usage.input_tokens + 20
    none = claude.messages.create(model="m", max_tokens=1, tools=tools, tool_choice={"type": "none"},
                                  messages=history[:1])
    assert none.usage.input_tokens < first.usage.input_tokens


@pytest.mark.parametrize("body,status,fragment", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'max_tokens' is required"),
    ({"max_tokens": 5, "messages": []}, 400, "'messages' must be a non-empty list"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "text only"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 400, "'top_k' is not supported"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, 400, "from 0 to 1"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "bash_20250124", "name": "bash"}]}, 400, "server tools"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "any"}}, 400,
     "needs 'tools'"),
])
def test_bad_messages_get_anthropic_errors(server: Server, body: dict, status: int,  # noqa: F811
                                           fragment: str) -> None:
    got, reply = raw(server, "POST", "/v1/messages", json.dumps(body))
    assert got == status and set(reply) == {"type", "error"} and reply["type"] == "error", reply
    assert reply["error"]["type"] == "invalid_request_error" and fragment in reply["error"]["message"], reply


def test_messages_errors_through_the_client(server: Server, claude: anthropic.Anthropic) -> None:  # noqa: F811
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="m", max_tokens=5, messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "authentication_error"
    status, body = raw(server, "GET", "/v1/messages")
    assert status == 405 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_required_forces_a_call_whose_arguments_match_the_schema(client: openai.OpenAI) -> None:  # noqa: F811
    """Under `auto` the default model answers ASK with text (it echoes the schema); `required` and a
    named function constrain sampling to a call, streamed or not, then the tool's result comes back
    through the template and the model answers."""
    auto = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=48,
                                          temperature=0)
    assert auto.choices[0].finish_reason != "tool_calls"  # what the grammar changes
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=48, temperature=0)
        c = reply.choices[0]
        assert c.finish_reason == "tool_calls", c.message.content
        call = c.message.tool_calls[0]
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=48, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=8,
                                       response_format={"type": "json_object"})
