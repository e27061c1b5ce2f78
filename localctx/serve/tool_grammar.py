"""The grammar of "a call to one of these tools, with arguments its schema accepts", for
tool_choice "required" or a named function: GBNF text, in the call syntax of the template's
family (serve/tools.py), for the engine's grammar-constrained sampling."""
from __future__ import annotations

import re

from ..engine.grammar import json_schema_grammar
from .tools import HERMES, LLAMA3, MISTRAL, ToolRequest

CALL_RULE = "localctx-call"  # no rule the converter writes has this name (it names rules after properties)


def call_grammar(request: ToolRequest, family: str) -> str | None:
    """GBNF for the calls the request requires; None when the model may also answer in text."""
    if request.choice in ("auto", "none"):
        return None
    key = "parameters" if family == LLAMA3 else "arguments"  # the key each family's own calls use
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
                         "required": ["name", key]} for t in request.offered()]}
    rules = re.sub(r"^root ::=", f"{CALL_RULE} ::=", json_schema_grammar(schema), flags=re.M)
    return f"root ::= {_root(family, request.parallel)}\n{rules}"


def _root(family: str, parallel: bool) -> str:
    more = "*"
    if family == HERMES:
        one = f'"<tool_call>\\n" {CALL_RULE} "\\n</tool_call>"'
        return f'{one} ("\\n" {one}){more}' if parallel else one
    if family == MISTRAL:  # [TOOL_CALLS] is a control token, not text: the array follows it
        return f'"[" {CALL_RULE} ("," " "? {CALL_RULE}){more} "]"' if parallel else f'"[" {CALL_RULE} "]"'
    sep = '";" " "?' if family == LLAMA3 else '"\\n"'
    return f"{CALL_RULE} ({sep} {CALL_RULE}){more}" if parallel else CALL_RULE
