"""Chat templates: rendered in a bounded sandbox, with message text kept apart from template text.

A chat template is Jinja code shipped inside a model file, so it is untrusted input. It is rendered
in jinja2's immutable sandbox (as llama-cpp-python and transformers do) with two additions:

* an operation budget: every loop iteration, call, attribute lookup, filter and operator is
  counted, sized by the text it produces, and rendering stops when the budget is spent, so
  `{% for i in range(100000) %}{% for j in range(100000) %}...` fails in a fraction of a second
  instead of hanging (a thread with a deadline could not be stopped);
* any failure (syntax error, undefined variable, sandbox violation, budget, empty output) is a
  ChatTemplateError naming the model, never a traceback.

`ChatTemplate.split` renders the conversation a second time with a unique placeholder for each
message's text and returns the prompt as segments: template text (whose control tokens such as
<|im_start|> are real) and message text (data: tokenized without special-token parsing, so a
document containing "<|im_end|>" cannot close its turn and open another).
"""
from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import ModelFileError

# Operations a render may spend before its messages are counted; the templates of real models
# spend a few dozen per message (SmolLM2's: 9 per message plus the size of the text it writes).
BASE_OPERATIONS = 1_000_000
# Each character of message text may be copied this many times (by `+`, `~`, filters, output).
OPERATIONS_PER_CHAR = 16
MAX_INT_BITS = 1 << 16  # integers a template may build by `*` and `**`
MAX_REASON = 300  # characters of an exception's message quoted in an error
_ITER = "__localctx_iter"
_CONCAT = "__localctx_concat"
_PLACEHOLDER = "\ue000{nonce}:{index}\ue001"  # private-use characters: no real text contains them
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")


class ChatTemplateError(ModelFileError):
    """A model's chat template that cannot render a conversation."""


class _BudgetSpent(Exception):
    pass


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt: template text, or a message's text (`data`)."""

    text: str
    data: bool


class _GenerationTag(jinja2.ext.Extension):
    """HuggingFace's `{% generation %}` block (marks assistant text for training): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # As transformers renders it (non-ASCII kept), not jinja2's HTML-safe variant.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 64
    return 0


class _Metering(NodeTransformer):
    """Route every for-loop's iterable and every `~` concatenation through metered filters: the
    two places where compiled templates do work without calling back into the environment."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _ITER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        items = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return nodes.Filter(items, _CONCAT, [], [], None, None, lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with an operation budget (see the module docstring)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        # optimized=False: no constant folding, which would run filters at compile time, unmetered.
        super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, optimized=False,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: self._metered(f) for name, f in self.filters.items()}
        self.tests = {name: self._metered(f) for name, f in self.tests.items()}
        self.filters[_ITER] = self._iterate
        self.filters[_CONCAT] = self._concat
        self.spent = 0
        self.limit = BASE_OPERATIONS

    def start(self, limit: int) -> None:
        self.spent, self.limit = 0, limit

    def charge(self, n: int = 1) -> None:
        self.spent += n
        if self.spent > self.limit:
            raise _BudgetSpent()

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Metering().visit(super()._parse(source, name, filename))

    def _metered(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
        def metered(*args: Any, **kwargs: Any) -> Any:
            self.charge()
            result = func(*args, **kwargs)
            self.charge(_size(result))
            return result

        return metered

    def _iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.charge()
            yield item

    def _concat(self, parts: Sequence[Any]) -> str:
        text = "".join(map(str, parts))
        self.charge(1 + len(text))
        return text

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.charge()
        result = super().call(__context, __obj, *args, **kwargs)
        __self.charge(_size(result))
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.charge()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self._precheck(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        self.charge(1 + _size(result))
        return result

    def _precheck(self, operator: str, left: Any, right: Any) -> None:
        """Refuse, before it is computed, a result too big to pay for (`'x' * 10**9`, `2 ** 10**9`)."""
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _BudgetSpent()
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                    self.charge(len(seq) * max(n, 0))
        elif operator == "**" and ints and abs(left) > 1 and right > 0:
            if left.bit_length() * right > MAX_INT_BITS:
                raise _BudgetSpent()
        elif operator == "%" and isinstance(left, str):
            widths = sum(int(w or 0) + int(p or 0) for w, p in _FORMAT_WIDTH.findall(left))
            self.charge(widths)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template itself (e.g. roles that do not alternate)."""


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's chat template (or, without one, a plain `role: text` format), rendered safely."""

    def __init__(self, source: str | None, *, origin: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._env: BoundedSandbox | None = None
        self._template: jinja2.Template | None = None
        if source:
            self._env = BoundedSandbox()
            try:
                self._template = self._env.from_string(source)
            except Exception as exc:  # TemplateSyntaxError, or anything the parser trips on
                raise self._error(exc) from None

    @property
    def stop(self) -> list[str]:
        """Strings that end a reply: the model's end-of-sequence text (as llama-cpp-python stops)."""
        if self._template is None:
            return ["\nuser:"]
        return [self.eos_token] if self.eos_token else []

    @functools.cached_property
    def variables(self) -> frozenset[str]:
        """The variables the template reads (e.g. `tools` when it has its own tool syntax)."""
        if self._env is None or not self.source:
            return frozenset()
        return frozenset(jinja2.meta.find_undeclared_variables(self._env.parse(self.source)))

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text, as the template writes it; `tools` as HF's apply_chat_template passes them."""
        if self._template is None:
            return "".join(s.text for s in self._plain(messages, add_generation_prompt))
        text = self._render(messages, add_generation_prompt, tools)
        if messages and not text.strip():
            raise self._error(None, "it rendered nothing for this conversation")
        return text

    def split(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
              tools: list[dict[str, Any]] | None = None) -> tuple[str, list[Segment] | None]:
        """The prompt text and its segments (template text and message text), or None for the
        segments when the template rewrites message text so that it cannot be located (then the
        caller must treat the whole text with care)."""
        if self._template is None:
            segments = self._plain(messages, add_generation_prompt)
            return "".join(s.text for s in segments), segments
        text = self.render(messages, add_generation_prompt, tools)
        nonce = secrets.token_hex(6)
        marked, cores = [], []
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, str) or not content:
                marked.append(message)
                cores.append(None)
                continue
            # Whitespace at the edges stays outside the placeholder, so a template that trims
            # message text (Llama 3's `| trim`) trims the placeholder the same way.
            core = content.strip()
            lead = content[: len(content) - len(content.lstrip())]
            trail = content[len(content.rstrip()):] if core else ""
            marked.append({**message, "content": lead + _PLACEHOLDER.format(nonce=nonce, index=i) + trail})
            cores.append(core)
        skeleton = self._render(marked, add_generation_prompt, tools)
        segments = _fill(skeleton, nonce, cores)
        if segments is None or "".join(s.text for s in segments) != text:
            return text, None
        return text, segments

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _plain(messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = []
        for m in messages:
            segments += [Segment(f"{m['role']}: ", False), Segment(str(m["content"]), True), Segment("\n", False)]
        if add_generation_prompt:
            segments.append(Segment("assistant: ", False))
        return [s for s in segments if s.text]

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        assert self._env is not None and self._template is not None
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        chars += len(json.dumps(tools)) if tools else 0  # the template may write each tool in full
        self._env.start(BASE_OPERATIONS + OPERATIONS_PER_CHAR * chars)
        out: list[str] = []
        try:
            for chunk in self._template.generate(
                messages=list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception,
                strftime_now=_strftime_now, functions=None, function_call=None, tools=tools, tool_choice=None,
            ):
                self._env.charge(len(chunk))
                out.append(chunk)
        except Exception as exc:
            raise self._error(exc) from None
        return "".join(out)

    def _error(self, exc: BaseException | None, reason: str | None = None) -> ChatTemplateError:
        reason = reason or _reason(exc, self._env.limit if self._env else BASE_OPERATIONS)
        return ChatTemplateError(
            f"The chat template in {self.origin} cannot be used: {reason}. Without --chat, `localctx generate` "
            "runs the model on plain text, without its template."
        )


def _reason(exc: BaseException | None, limit: int) -> str:
    if isinstance(exc, _BudgetSpent):
        return (f"it did not finish within its budget of {limit:,} operations (a loop that does not end, "
                "or far more work than a chat prompt needs)")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error on line {exc.lineno}: {_clip(exc.message or str(exc))}"
    if isinstance(exc, jinja2.sandbox.SecurityError):
        return f"it tried something the template sandbox forbids ({_clip(str(exc))})"
    if isinstance(exc, jinja2.UndefinedError):
        return f"it uses something undefined ({_clip(str(exc))})"
    if isinstance(exc, _TemplateRaised):
        return f"it refused this conversation: {_clip(str(exc))}"
    if isinstance(exc, RecursionError):
        return "it recursed too deeply"
    if isinstance(exc, MemoryError):
        return "it needed more memory than there is"
    return f"{type(exc).__name__}: {_clip(str(exc))}"


def _clip(text: str) -> str:
    text = text.rstrip(".")
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "…"


def _fill(skeleton: str, nonce: str, cores: list[str | None]) -> list[Segment] | None:
    """Replace each placeholder in `skeleton` by its message's text; None if one is unknown."""
    pattern = re.compile(re.escape("\ue000" + nonce + ":") + r"(\d+)" + re.escape("\ue001"))
    segments: list[Segment] = []
    pos = 0
    for match in pattern.finditer(skeleton):
        index = int(match.group(1))
        if index >= len(cores) or cores[index] is None:
            return None
        if match.start() > pos:
            segments.append(Segment(skeleton[pos:match.start()], False))
        if cores[index]:
            segments.append(Segment(cores[index], True))
        pos = match.end()
    if pos < len(skeleton):
        segments.append(Segment(skeleton[pos:], False))
    return segments
