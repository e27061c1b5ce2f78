"""`localctx serve`'s sampling extras through the official `openai` client against a real server:
logprobs (chat and completions, streamed and not), presence/frequency penalties and logit_bias,
response_format (json_object, json_schema validated with `jsonschema`), and the 400s for what is
out of range or cannot be enforced."""
from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from localctx.engine import Engine
from test_serve import KEY, Server, assert_api_error, raw, start_server

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                   "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "minItems": 1,
                                 "maxItems": 3}},
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("sampling-home"), "--api-key", KEY)
    try:
        yield srv
    finally:
        rc = srv.stop(signal.SIGINT)
        if srv.proc.poll() is None:
            srv.proc.kill()
        assert rc == 0 and "Traceback" not in srv.log_text(), srv.log_text()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy_chat(client: openai.OpenAI, max_tokens: int = 8, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="m", messages=CHAT, max_tokens=max_tokens, temperature=0, **extra)


# --- logprobs ---------------------------------------------------------------------------------------


def test_chat_logprobs_sorted_and_greedy_is_the_max(client: openai.OpenAI) -> None:
    reply = greedy_chat(client, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content
    for t in content:
        top = [a.logprob for a in t.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] <= 0
        # Greedy picks the most likely token of the raw distribution (no bias, no penalty here).
        assert t.logprob == pytest.approx(top[0]) and t.token == t.top_logprobs[0].token
        assert math.fsum(math.exp(x) for x in top) <= 1 + 1e-6
    assert greedy_chat(client).choices[0].logprobs is None  # not asked: none


def test_chat_logprobs_streamed_match_the_whole(client: openai.OpenAI) -> None:
    whole = greedy_chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in greedy_chat(client, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-3)


def test_completion_logprobs_legacy_shape(client: openai.OpenAI) -> None:
    prompt = "1, 2, 3, 4,"
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text and len(lp.tokens) == 6
    assert lp.text_offset[0] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="m", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, stream=True) if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


# --- penalties and logit_bias -----------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, small_engine: Engine) -> None:
    first = greedy_chat(client, logprobs=True).choices[0].logprobs.content[0]
    ids = small_engine.tokenize(first.token, add_bos=False)
    assert len(ids) == 1, ids
    banned = greedy_chat(client, logprobs=True, logit_bias={str(ids[0]): -100}).choices[0].logprobs.content[0]
    assert banned.token != first.token
    # The logprobs stay the model's own: the banned token's choice is the old runner-up.
    assert banned.logprob < first.logprob
    forced = small_engine.tokenize(" banana", add_bos=False)[0]
    text = greedy_chat(client, max_tokens=3, logit_bias={str(forced): 100}).choices[0].message.content
    assert text == small_engine.detokenize([forced] * 3), text


def test_penalties_are_accepted_and_change_a_repetitive_answer(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Say the word 'apple' ten times."}]

    def answer(**extra: float) -> str:
        return client.chat.completions.create(model="m", messages=ask, max_tokens=16, temperature=0,
                                              **extra).choices[0].message.content

    plain = answer()
    assert plain.lower().count("apple") >= 5, plain  # the model repeats itself without a penalty
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalized = answer(**extra)
        assert penalized.lower().count("apple") < plain.lower().count("apple"), (extra, plain, penalized)


# --- response_format --------------------------------------------------------------------------------


def test_json_object_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Give a JSON object with a cat's name and colour."}],
        max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop", reply
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    args = dict(model="m", messages=[{"role": "user", "content": "Invent a person: name, age, languages."}],
                max_tokens=80, temperature=0.7, seed=7,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                        "strict": True}})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    else:
        reply = client.chat.completions.create(**args)
        assert reply.choices[0].finish_reason == "stop", reply
        text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(("schema", "fragment"), [
    ({"type": "integer", "minimum": 3}, "'minimum' at /"),
    ({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}}, "'format' at /properties/mail"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "'patternProperties'"),
    ({"$ref": "https://example.com/schema.json"}, "'$ref'"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf'"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b' is required"),
])
def test_unsupported_schema_part_is_a_400_naming_it(server: Server, schema: dict, fragment: str) -> None:
    body = {"messages": CHAT, "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": schema}}}
    error = assert_api_error(*raw(server, "POST", "/v1/chat/completions", json.dumps(body)), 400, fragment)
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "unsupported_schema"


@pytest.mark.parametrize(("extra", "fragment", "param"), [
    ({"logprobs": "yes"}, "'logprobs' must be a boolean", "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be from 0 to 20", "top_logprobs"),
    ({"top_logprobs": 2}, "needs 'logprobs': true", "top_logprobs"),
    ({"presence_penalty": 2.5}, "'presence_penalty' must be from -2 to 2", "presence_penalty"),
    ({"frequency_penalty": "x"}, "'frequency_penalty' must be a number", "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "token ids", "logit_bias"),
    ({"logit_bias": {"5": -101}}, "from -100 to 100", "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, "not in the vocabulary", "logit_bias"),
    ({"response_format": {"type": "xml"}}, "json_object or json_schema", "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name",
     "response_format.json_schema.name"),
])
def test_bad_sampling_fields_are_400s(server: Server, extra: dict, fragment: str, param: str) -> None:
    body = json.dumps({"messages": CHAT, "max_tokens": 1, **extra})
    error = assert_api_error(*raw(server, "POST", "/v1/chat/completions", body), 400, fragment)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_completion_logprobs_range(server: Server) -> None:
    body = json.dumps({"prompt": "a", "max_tokens": 1, "logprobs": 6})
    assert_api_error(*raw(server, "POST", "/v1/completions", body), 400, "'logprobs' must be from 0 to 5")
