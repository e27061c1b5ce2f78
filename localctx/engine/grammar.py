"""Grammars for constrained generation: any JSON object, or JSON that a schema accepts.

The conversion is llama-cpp-python's (backend.schema_to_gbnf). That converter silently ignores
every keyword it does not implement (a `maximum`, an `email` format, `patternProperties`...) and,
for a schema node, acts on one keyword group only (`anyOf` wins over `properties`, `pattern` over
`maxLength`). An output would then look enforced and not be. So a schema is checked here first:
each node must be one kind the converter enforces whole, with only that kind's keywords, and
anything else is a SchemaError naming the node's path and the keyword (an API answers it 400).
Annotations (title, description, examples...) are dropped before the conversion, as they
constrain nothing."""
from __future__ import annotations

import json
from typing import Any

from .backend import JSON_OBJECT_GBNF, GrammarError, schema_to_gbnf

ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id"})
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
# The keywords each kind of node may carry besides `type` (what the converter enforces for it).
KINDS: dict[str, frozenset[str]] = {
    "ref": frozenset({"$ref"}),
    "anyOf": frozenset({"anyOf"}),
    "const": frozenset({"const"}),
    "enum": frozenset({"enum"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "tuple": frozenset({"prefixItems"}),
    "pattern": frozenset({"pattern"}),
    "format": frozenset({"format"}),
    "length": frozenset({"minLength", "maxLength"}),
}
HINTS = {
    "oneOf": "use anyOf: the grammar cannot make alternatives exclusive",
    "allOf": "merge the parts into one schema",
    "$ref": "only local references (#/$defs/...) can be followed",
}


class SchemaError(GrammarError):
    """A schema with a part the grammar cannot enforce; `path` is where (JSON pointer style)."""

    def __init__(self, path: str, keyword: str, why: str) -> None:
        super().__init__(f"The JSON schema's '{keyword}' at {path or '/'} cannot be enforced: {why}.")
        self.path, self.keyword = path, keyword


def json_object_grammar() -> str:
    """A GBNF grammar for any JSON object."""
    return JSON_OBJECT_GBNF


def json_schema_grammar(schema: Any) -> str:
    """A GBNF grammar (root rule `root`) for JSON that `schema` accepts; SchemaError for a part
    the grammar cannot enforce, never a grammar that ignores it."""
    if not isinstance(schema, dict):
        raise SchemaError("", "schema", "a schema must be a JSON object")
    try:
        checked = check_schema(schema)
    except RecursionError:
        raise SchemaError("", "schema", "it is nested too deeply") from None
    return _no_control_chars(schema_to_gbnf(json.dumps(checked)))


def _no_control_chars(grammar: str) -> str:
    # The converter's string character class lets raw control characters (a newline) into a JSON
    # string, which no JSON parser accepts; its own JSON grammar excludes them, and so does this.
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def check_schema(schema: dict[str, Any], path: str = "") -> dict[str, Any]:
    """The schema without annotations, once every node is known to be enforceable."""
    out = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
    for container in ("$defs", "definitions"):
        if container in out:
            defs = out.pop(container)
            if not isinstance(defs, dict) or path:
                raise SchemaError(path, container, "definitions belong at the root, as an object of schemas")
            out[container] = {name: _node(sub, f"/{container}/{name}") for name, sub in defs.items()}
    kind = _kind(out, path)
    _check_kind(out, kind, path)
    return {**out, **_children(out, path)}


def _node(value: Any, path: str) -> dict[str, Any]:
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise SchemaError(path, "schema", f"a schema must be an object, not {type(value).__name__}")
    return check_schema(value, path)


def _kind(node: dict[str, Any], path: str) -> str:
    """Which kind the node is, from its keywords; refuses keywords of no kind or of two."""
    keys = sorted(set(node) - {"type", "$defs", "definitions"})
    by_kind: dict[str, str] = {}  # kind -> its first keyword here
    for key in keys:
        kind = next((k for k, allowed in KINDS.items() if key in allowed), None)
        if kind is None:
            raise SchemaError(path, key, HINTS.get(key, "the grammar converter does not implement it"))
        if key == "items" and isinstance(node[key], list):
            kind = "tuple"  # the older tuple form: as prefixItems
        by_kind.setdefault(kind, key)
    if len(by_kind) > 1:
        (_, first), (_, second) = list(by_kind.items())[:2]
        raise SchemaError(path, second, f"it cannot be combined with '{first}' in one schema (only one is applied)")
    return next(iter(by_kind), "type")


def _check_kind(node: dict[str, Any], kind: str, path: str) -> None:
    t = node.get("type")
    if isinstance(t, list):
        if kind != "type" or not t or any(x not in TYPES for x in t):
            raise SchemaError(path, "type", "a list of types must hold type names only and stand alone")
        return
    if t is not None and t not in TYPES:
        raise SchemaError(path, "type", f"unknown type {t!r}")
    wants = {"object": "object", "array": "array", "tuple": "array", "pattern": "string", "format": "string",
             "length": "string"}.get(kind)
    if wants and t not in (None, wants) or kind == "length" and t != "string":
        raise SchemaError(path, "type", f"'{kind}' keywords need type {wants!r}")
    if kind == "type" and t is None and set(node) - {"$defs", "definitions"}:
        raise SchemaError(path, "type", "the node has no type")
    if kind in ("ref", "anyOf") and t is not None:
        raise SchemaError(path, "type", f"the converter follows '{kind}' alone and would not check the type")
    if kind == "array" and "items" not in node:
        raise SchemaError(path, "minItems" if "minItems" in node else "maxItems", "a length needs 'items'")
    if kind == "ref" and not (isinstance(node["$ref"], str) and node["$ref"].startswith("#/")):
        raise SchemaError(path, "$ref", HINTS["$ref"])
    if kind == "format" and node["format"] not in FORMATS:
        raise SchemaError(path, "format", f"format {node['format']!r} is not one of {', '.join(sorted(FORMATS))}")
    if kind == "pattern" and not (isinstance(node["pattern"], str) and node["pattern"].startswith("^")
                                  and node["pattern"].endswith("$")):
        raise SchemaError(path, "pattern", "a pattern must be anchored (^...$)")
    if kind == "object":
        _check_object(node, path)
    if kind == "enum" and (not isinstance(node["enum"], list) or not node["enum"]):
        raise SchemaError(path, "enum", "it must be a non-empty list")
    if kind == "anyOf" and (not isinstance(node["anyOf"], list) or not node["anyOf"]):
        raise SchemaError(path, "anyOf", "it must be a non-empty list of schemas")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in node and (isinstance(node[key], bool) or not isinstance(node[key], int) or node[key] < 0):
            raise SchemaError(path, key, "it must be a non-negative integer")


def _check_object(node: dict[str, Any], path: str) -> None:
    props = node.get("properties", {})
    if not isinstance(props, dict):
        raise SchemaError(path, "properties", "it must be an object of schemas")
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(path, "required", "it must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        # The converter only writes the properties it lists: a required one it does not know is never produced.
        raise SchemaError(path, "required", f"{missing[0]!r} is required but not among the properties")


def _children(node: dict[str, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node.get("properties"), dict):
        out["properties"] = {k: _node(v, f"{path}/properties/{k}") for k, v in node["properties"].items()}
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = _node(extra, f"{path}/additionalProperties")
    elif extra is not None and not isinstance(extra, bool):
        raise SchemaError(path, "additionalProperties", "it must be a boolean or a schema")
    items = node.get("items")
    if isinstance(items, list):
        out["items"] = [_node(v, f"{path}/items/{i}") for i, v in enumerate(items)]
    elif items is not None:
        out["items"] = _node(items, f"{path}/items")
    for key in ("prefixItems", "anyOf"):
        if isinstance(node.get(key), list):
            out[key] = [_node(v, f"{path}/{key}/{i}") for i, v in enumerate(node[key])]
    return out
