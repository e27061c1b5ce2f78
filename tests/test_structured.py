"""Grammars and logprobs at the library level: engine.grammar's schema check (what llama-cpp-python's
converter would ignore is refused, with its path), Engine.start(grammar=...) on the real default
model, and Run.picks against the logits the engine reports."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from localctx.engine import Engine
from localctx.engine.grammar import SchemaError, check_schema, json_object_grammar, json_schema_grammar

TOOL_CALL = {  # the shape issue 24's tool_choice: required will ask for
    "type": "object",
    "properties": {"name": {"const": "get_weather"},
                   "arguments": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"], "additionalProperties": False}},
    "required": ["name", "arguments"],
}


@pytest.mark.parametrize(("schema", "keyword", "path"), [
    ({"type": "number", "exclusiveMaximum": 3}, "exclusiveMaximum", ""),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", ""),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}}, "format", "/properties/a"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}, "b": {"not": {}}}}, "not",
     "/properties/b"),
    ({"$defs": {"x": {"type": "string", "pattern": "^a$", "minLength": 2}}, "$ref": "#/$defs/x"}, "pattern",
     "/$defs/x"),
    ({"allOf": [{"type": "object"}]}, "allOf", ""),
    ({"type": ["object", "null"], "properties": {}}, "type", ""),
    ({"type": "string", "pattern": "a+"}, "pattern", ""),
])
def test_unenforceable_parts_are_refused_with_their_path(schema: dict, keyword: str, path: str) -> None:
    with pytest.raises(SchemaError) as info:
        json_schema_grammar(schema)
    assert (info.value.keyword, info.value.path) == (keyword, path)
    assert f"'{keyword}'" in str(info.value)


def test_annotations_are_dropped_and_local_refs_kept() -> None:
    schema = {"title": "T", "$defs": {"c": {"enum": ["a", "b"], "description": "d"}},
              "type": "object", "properties": {"x": {"$ref": "#/$defs/c"}}, "required": ["x"]}
    assert check_schema(schema) == {"$defs": {"c": {"enum": ["a", "b"]}}, "type": "object",
                                    "properties": {"x": {"$ref": "#/$defs/c"}}, "required": ["x"]}
    assert '"\\"a\\""' in json_schema_grammar(schema)


def test_engine_grammar_forces_a_tool_call(small_engine: Engine) -> None:
    tokens = small_engine.chat_tokens([{"role": "user", "content": "What is the weather in Paris?"}])
    gen = small_engine.complete(tokens, max_tokens=64, temperature=0, grammar=json_schema_grammar(TOOL_CALL),
                                stop=small_engine.chat_stop)
    assert gen.finish_reason == "stop", gen.text
    jsonschema.validate(json.loads(gen.text), TOOL_CALL)
    assert json_object_grammar().lstrip().startswith("root")


def test_a_grammar_llama_cpp_refuses_is_an_error(small_engine: Engine) -> None:
    from localctx.engine.backend import GrammarError

    with pytest.raises(GrammarError):
        small_engine.start(small_engine.tokenize("a"), max_tokens=1, grammar="root ::= (")
    assert len(small_engine.free_slots()) == small_engine.n_seq  # nothing was left running


def test_picks_are_the_log_softmax_of_the_logits(small_engine: Engine) -> None:
    tokens = small_engine.tokenize("The capital of France is")
    run = small_engine.start(tokens, seq=0, max_tokens=1, temperature=0, logprobs=4)
    while not run.done:
        small_engine.step()
    logits = small_engine.logits_at(tokens, [len(tokens) - 1])[0].astype(np.float64)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    (pick,) = run.picks
    assert pick.token == int(np.argmax(logits)) and pick.logprob == pytest.approx(expected[pick.token], abs=1e-3)
    assert [t for t, _ in pick.top] == list(np.argsort(-expected)[:4])


def test_checking_the_chosen_token_first_gives_the_grammar_first_answer(small_engine: Engine,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The sampler checks the chain's own pick against the grammar before masking every candidate
    # (llama.cpp's shortcut); greedy must choose exactly what masking first would.
    from localctx.engine.backend import Sampler

    tokens = small_engine.chat_tokens([{"role": "user", "content": "What is the weather in Paris?"}])
    kwargs = dict(max_tokens=16, temperature=0, grammar=json_schema_grammar(TOOL_CALL))
    shortcut = small_engine.complete(tokens, **kwargs).text
    monkeypatch.setattr(Sampler, "_allowed", lambda self, token: False)  # always mask first
    assert small_engine.complete(tokens, **kwargs).text == shortcut
