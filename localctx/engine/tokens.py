"""Text to tokens and back, and the model's chat template: message text is data (never parsed for
control tokens), template text may carry them, exactly as llama.cpp tokenizes a whole prompt."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..chat_template import ChatTemplate, Segment
from ..errors import InputError
from ..gguf_meta import ModelFacts
from .backend import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_SPECIAL, Model

_C_SPACE = " \t\n\v\f\r"  # C's isspace(), which llama.cpp's lstrip/rstrip use


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: list[str]


class Tokenizer:
    """The vocabulary of a loaded model and its chat template (compiled on first use, so a model
    whose template is broken still runs plain completions)."""

    def __init__(self, model: Model, facts: ModelFacts) -> None:
        self.model, self.facts = model, facts
        self._template: ChatTemplate | None = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def count(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def token_attr(self, token: int) -> int:
        return self.model.attr(token)

    # --- chat ------------------------------------------------------------------------------------

    def template(self) -> ChatTemplate:
        if self._template is None:
            m = self.model
            eos = m.text(m.eos) if m.eos >= 0 else ""
            bos = m.text(m.bos) if m.bos >= 0 else ""
            self._template = ChatTemplate(self.facts.chat_template, origin=str(self.facts.path),
                                          bos_token=bos, eos_token=eos)
        return self._template

    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        template = self.template()
        return ChatPrompt(template.render(messages, add_generation_prompt), template.stop)

    def chat_tokens(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The conversation's tokens (with `tools` for a template that renders them). The
        template's own text is tokenized with its control tokens (<|im_start|>, BOS: the template
        writes any BOS itself, nothing is added); message text is data, tokenized without
        special-token parsing, so a document cannot inject chat markup. For text without
        control-token strings the tokens are those of the whole rendered prompt."""
        text, segments = self.template().split(messages, add_generation_prompt, tools)
        self._refuse_control_json(messages, tools)
        if segments is None:
            # The template rewrites message text, so it cannot be told apart from the template's:
            # safe only while no message carries a control token's text.
            self._refuse_control_text(messages)
            return self.tokenize(text, add_bos=False, special=True)
        return self._tokenize_segments(segments)

    def _tokenize_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Tokenize as llama.cpp tokenizes the whole prompt with special tokens, except that only
        the template's text may yield them: each run of plain text between two special tokens
        (template text and message text together) is tokenized in one piece, without special
        parsing, exactly as llama.cpp tokenizes the fragments it splits at special tokens."""
        tokens: list[int] = []
        run: list[str] = []
        before = 0  # attributes of the special token before the current run (0: start of text)
        for seg in segments:
            if seg.data:
                run.append(seg.text)
                continue
            head, middle, tail, first, last = self._split_at_specials(seg.text)
            if middle is None:
                run.append(seg.text)
                continue
            run.append(head)
            tokens += self._tokenize_run("".join(run), before, first)
            tokens += self.tokenize(middle, add_bos=False, special=True)
            run, before = [tail], last
        tokens += self._tokenize_run("".join(run), before, 0)
        return tokens

    def _tokenize_run(self, text: str, before: int, after: int) -> list[int]:
        # Special tokens marked rstrip/lstrip eat the whitespace beside them (llama.cpp's rule).
        if before & ATTR_RSTRIP:
            text = text.lstrip(_C_SPACE)
        if after & ATTR_LSTRIP:
            text = text.rstrip(_C_SPACE)
        return self.tokenize(text, add_bos=False, special=False) if text else []

    def _split_at_specials(self, text: str) -> tuple[str, str | None, str, int, int]:
        """Template text as (plain head, middle from the first special token to the end of the
        last, plain tail, attributes of the first and last special token); middle is None when
        the text holds no special token."""
        spans: list[tuple[int, int, int]] = []
        pos = 0
        for token in self.tokenize(text, add_bos=False, special=True):
            attr = self.model.attr(token)
            if attr & ATTR_SPECIAL:
                piece = self.model.text(token)
                at = text.find(piece, pos)
                if not piece or at < 0:  # cannot place it: keep the whole text as one special block
                    return "", text, "", 0, 0
                spans.append((at, at + len(piece), attr))
                pos = at + len(piece)
        if not spans:
            return text, None, "", 0, 0
        return text[: spans[0][0]], text[spans[0][0] : spans[-1][1]], text[spans[-1][1] :], spans[0][2], spans[-1][2]

    def control_tokens_in(self, text: str) -> list[str]:
        """The control tokens of this model (<|im_end|>, BOS ...) that `text` would produce if it
        were tokenized as template text: what a user's text must not carry into a template."""
        return [self.model.text(t) for t in self.tokenize(text, add_bos=False, special=True)
                if self.model.attr(t) & ATTR_CONTROL]

    def _refuse_control_json(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
        """Tool definitions and past calls are written by the template itself (as JSON), so they
        are template text: one that carries a control token's text is refused, not tokenized."""
        calls = [{k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k)} for m in messages
                 if m.get("tool_calls") or m.get("role") == "tool"]
        for what, value in (("tool definition", tools), ("tool call", calls)):
            found = self.control_tokens_in(json.dumps(value, ensure_ascii=False)) if value else []
            if found:
                raise InputError(f"A {what} contains {found[0]!r}, a control token of this model; the chat "
                                 "template writes it as template text, so it cannot be kept as plain text.")

    def _refuse_control_text(self, messages: list[dict[str, str]]) -> None:
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str):
                continue
            found = self.control_tokens_in(content)
            if found:
                raise InputError(
                    f"A {m.get('role', 'chat')} message contains {found[0]!r}, a control token "
                    f"of this model, and the chat template in {self.facts.path} rewrites message text, so "
                    "localctx cannot keep it as plain text. Remove that marker from the text, or run "
                    "`localctx generate` without --chat."
                )


class TextMethods:
    """The Engine's text methods, each its tokenizer's (kept on the engine: the public API's
    model object is the engine)."""

    tokenizer: Tokenizer

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    def count(self, text: str) -> int:
        return self.tokenizer.count(text)

    def is_eog(self, token: int) -> bool:
        return self.tokenizer.is_eog(token)

    def token_attr(self, token: int) -> int:
        return self.tokenizer.token_attr(token)

    @property
    def chat_stop(self) -> list[str]:
        """The strings that end a chat reply."""
        return self.tokenizer.template().stop

    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        return self.tokenizer.format_chat(messages, add_generation_prompt)

    def chat_tokens(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenizer.chat_tokens(messages, add_generation_prompt, tools)

    def control_tokens_in(self, text: str) -> list[str]:
        return self.tokenizer.control_tokens_in(text)
