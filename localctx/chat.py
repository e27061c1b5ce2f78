"""The chat REPL over the engine. Input and output are injected so tests drive it with fakes."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .documents import read_text
from .engine import Engine, Switch, Timings
from .errors import InputError, LocalctxError
from .fsutil import atomic_write
from .generate import common_prefix
from .kvcache import snapshot_notice

HELP = """Commands:
  \"\"\"            start or end a multi-line message
  /read FILE     attach a document to the conversation (kept when old turns are dropped)
  /clear         forget the conversation (keeps the system prompt; auto goes back to s = 1)
  /save FILE     save the conversation as JSON       /load FILE   load a saved conversation
  /stats         tokens used against the window, the scaling in use, prompt and generation speeds
  /help          this text                           /exit        leave (also Ctrl-D)
Ctrl-C stops a reply and keeps the session; Ctrl-C on an empty line exits."""


@dataclass
class Message:
    role: str
    content: str
    pinned: bool = False  # system prompt and attached documents survive dropping old turns

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class ChatStats:
    turns: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    last: Timings | None = None

    def add(self, t: Timings) -> None:
        self.turns += 1
        self.prompt_tokens += t.prompt_tokens
        self.prompt_seconds += t.prompt_seconds
        self.generated_tokens += t.generated_tokens
        self.generation_seconds += t.generation_seconds
        self.last = t


@dataclass
class ChatSession:
    engine: Engine
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int = 0
    messages: list[Message] = field(default_factory=list)
    stats: ChatStats = field(default_factory=ChatStats)
    # Where notices go (the REPL sends them to stderr): a change of scaling, and what it cost.
    notice: Callable[[str], None] = field(default=lambda _: None, repr=False)

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append(Message("system", self.system, pinned=True))

    @property
    def window(self) -> int:
        """The largest window a turn may use (with `auto`, the top of its ladder)."""
        return self.engine.max_ctx

    def tokens_for(self, messages: list[Message], generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens: typed messages and attached documents are data, tokenized
        without special-token parsing (a `<|im_end|>` in them is text, not a turn boundary)."""
        return self.engine.chat_tokens([m.as_dict() for m in messages], add_generation_prompt=generation_prompt)

    def used_tokens(self) -> int:
        return len(self.tokens_for(self.messages, generation_prompt=False)) if self.messages else 0

    def needed_for(self, user_text: str) -> int:
        return len(self.tokens_for(self.messages + [Message("user", user_text)])) + self.max_tokens

    def droppable_turns(self) -> int:
        return sum(1 for m in self.messages if not m.pinned and m.role == "user")

    def drop_oldest_until_fits(self, user_text: str) -> int:
        """Drop whole user/assistant turns, oldest first, never pinned messages. Returns turns dropped."""
        dropped = 0
        while self.needed_for(user_text) > self.window and self.droppable_turns():
            first = next(i for i, m in enumerate(self.messages) if not m.pinned and m.role == "user")
            del self.messages[first]
            while first < len(self.messages) and not self.messages[first].pinned and self.messages[first].role == "assistant":
                del self.messages[first]
            dropped += 1
        return dropped

    def attach(self, path: Path) -> int:
        text = read_text(path)
        self.messages.append(Message("user", f"Document {path.name}:\n\n{text}", pinned=True))
        self.messages.append(Message("assistant", f"I have read {path.name}.", pinned=True))
        return len(self.engine.tokenize(text, add_bos=False))

    def document_end(self, tokens: list[int]) -> int | None:
        """How many leading `tokens` are the conversation up to its last attached document (and the
        reply acknowledging it): what a KV snapshot can hold for the next chat about it."""
        last = max((i for i, m in enumerate(self.messages) if m.pinned and m.role != "system"), default=None)
        if last is None:
            return None
        return common_prefix(tokens, self.tokens_for(self.messages[: last + 1], generation_prompt=False))

    def reply(self, user_text: str, write: Callable[[str], None]) -> Timings:
        """Stream the answer to `user_text`; on Ctrl-C the partial answer is kept."""
        # Built before the message is added: a template that fails leaves the conversation as it was.
        tokens = self.tokens_for(self.messages + [Message("user", user_text)])
        self.engine.check_fits(len(tokens), self.max_tokens)
        stop = self.engine.chat_stop
        switch = self.engine.use_window(len(tokens) + self.max_tokens)
        if switch is not None:
            self.notice(switch_notice(switch, len(tokens) + self.max_tokens, len(tokens)))
        self.messages.append(Message("user", user_text))
        gen = self.engine.generate(tokens, max_tokens=self.max_tokens, temperature=self.temperature,
                                   seed=self.seed, stop=stop, document_end=self.document_end(tokens))
        try:
            for chunk in gen:
                write(chunk)
        finally:
            # Runs on KeyboardInterrupt too: whatever was said stays in the conversation.
            gen.chunks.close()
            self.messages.append(Message("assistant", gen.text.strip()))
            self.stats.add(gen.timings)
            kv = snapshot_notice(gen.timings)
            if kv:
                self.notice(kv)
            if switch is not None:
                self.notice(f"[scaling] re-evaluated {gen.timings.prompt_tokens:,} tokens at the new scaling in "
                            f"{gen.timings.prompt_seconds:.1f} s (new context created in {switch.seconds:.2f} s; "
                            "weights not reloaded)")
        return gen.timings

    def ask(self, text: str) -> str:
        """One turn, as a program takes it: the whole reply. A turn that does not fit the window
        raises ContextOverflowError and changes nothing (drop turns with `drop_oldest_until_fits`)."""
        self.reply(text, lambda _: None)
        return self.messages[-1].content

    def clear(self) -> None:
        """Forget the conversation but the system prompt; an adaptive engine goes back to its
        smallest window (s = 1), which frees the larger KV cache."""
        self.messages = [m for m in self.messages if m.role == "system"]
        self.engine.use_window(0)

    def scaling(self) -> str:
        """The scaling in use, in words: 'yarn s=2, window 16,384 of up to 32,768'."""
        p = self.engine.params
        if not self.engine.ladder.adaptive:
            return p.scaling
        return f"{p.scaling}, window {p.n_ctx:,} of up to {self.window:,}"

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, atomically: a failed save leaves a previous file intact."""
        data = {"model": str(self.engine.facts.path), "preset": self.engine.params.preset,
                "messages": [{**m.as_dict(), "pinned": m.pinned} for m in self.messages]}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (undecodable input bytes) survive as \u escapes
            text = json.dumps(data, indent=2) + "\n"
        try:
            if not path.parent.is_dir():  # a typo should not create directories
                raise NotADirectoryError(0, f"{path.parent} is not a directory")
            atomic_write(path, text)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LocalctxError(f"Cannot save to {path}: {reason}. Nothing was written; "
                                "choose another path.") from None

    def load(self, path: Path) -> None:
        """Replace the conversation with one saved by `save`; anything else changes nothing."""
        try:
            if path.exists() and not path.is_file():  # a directory, or a FIFO that would block
                raise InputError(f"{path} is not a file.")
            data = json.loads(path.read_bytes())
            messages = [_message(m) for m in data["messages"]]
        except FileNotFoundError:
            raise InputError(f"File not found: {path}") from None
        except OSError as exc:
            raise InputError(f"Cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise InputError(f"{path} is not a conversation saved by /save ({type(exc).__name__}: {exc}).") from None
        self.messages = messages

    def stats_text(self) -> str:
        used = self.used_tokens()
        s = self.stats
        window = self.engine.n_ctx
        lines = [f"context: {used:,} / {window:,} tokens used ({100 * used / window:.1f}%), "
                 f"preset {self.engine.params.preset}, {len(self.messages)} messages",
                 f"scaling: {self.scaling()}"]
        if s.last:
            restored = f" ({s.last.restored_tokens:,} restored from a KV snapshot)" if s.last.restored_tokens else ""
            lines.append(f"last turn: prompt {s.last.prompt_tokens:,} tok{restored} at {s.last.prompt_tps:.1f} tok/s, "
                         f"generated {s.last.generated_tokens:,} tok at {s.last.generation_tps:.1f} tok/s")
            pt = s.prompt_tokens / s.prompt_seconds if s.prompt_seconds else 0
            gt = s.generated_tokens / s.generation_seconds if s.generation_seconds else 0
            lines.append(f"session: {s.turns} turns, prompt {pt:.1f} tok/s, generation {gt:.1f} tok/s")
        return "\n".join(lines)

    def meter(self) -> str:
        used = self.used_tokens()
        width, window = 20, self.engine.n_ctx
        filled = min(width, round(width * used / window))
        meter = f"[{'#' * filled}{'.' * (width - filled)}] {used:,}/{window:,} tokens"
        return f"{meter} ({self.scaling()})" if self.engine.ladder.adaptive else meter


def switch_notice(switch: Switch, needed: int, conversation: int) -> str:
    """What a change of scaling says before the conversation is evaluated again."""
    b, a = switch.before, switch.after
    where = (f"past the {b.n_ctx:,}-token window ({b.scaling})" if a.n_ctx > b.n_ctx
             else f"which fits a smaller window than {b.n_ctx:,} ({b.scaling})")
    return (f"[scaling] this turn needs {needed:,} tokens, {where}: moving to {a.n_ctx:,} tokens "
            f"({a.scaling}). A KV cache computed under one RoPE scaling cannot be reused under another, "
            f"so the conversation ({conversation:,} tokens) is evaluated again.")


def _message(data: object) -> Message:
    """A saved message; TypeError/ValueError for anything `save` would not have written."""
    if not isinstance(data, dict):
        raise TypeError(f"a message is {type(data).__name__}, not an object")
    role, content = data["role"], data["content"]
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise ValueError(f"not a message: role {role!r}, content of type {type(content).__name__}")
    return Message(role, content, bool(data.get("pinned")))


# --- The loop ----------------------------------------------------------------------------------


@dataclass
class Console:
    """How the REPL talks to the world: `read` returns None at end of input (Ctrl-D)."""

    read: Callable[[str], str | None]
    out: TextIO
    err: TextIO
    interactive: bool

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def _read_message(console: Console) -> str | None:
    line = console.read(">>> " if console.interactive else "")
    if line is None or line.strip() != '"""':
        return line
    lines: list[str] = []
    while True:
        more = console.read("... " if console.interactive else "")
        if more is None or more.strip() == '"""':
            return "\n".join(lines)
        lines.append(more)


def run_repl(session: ChatSession, console: Console) -> None:
    session.notice = console.say
    if console.interactive:
        grows = f", growing to {session.window:,} as the conversation needs" if session.engine.ladder.adaptive else ""
        console.say(f"localctx chat: {session.engine.facts.name}, preset {session.engine.params.preset}, "
                    f"window {session.engine.n_ctx:,} tokens{grows}. /help for commands.")
    while True:
        try:
            text = _read_message(console)
        except KeyboardInterrupt:
            console.say("")
            return  # Ctrl-C on an empty line
        if text is None:
            return
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            if _command(session, console, text.strip()) == "exit":
                return
            continue
        if not _make_room(session, console, text):
            continue
        try:
            session.reply(text, lambda chunk: (console.out.write(chunk), console.out.flush()))
        except KeyboardInterrupt:
            console.say("\n[reply stopped]")
        except LocalctxError as exc:
            console.say(f"Error: {exc}")
            continue
        console.out.write("\n")
        console.out.flush()
        if console.interactive:
            console.say(session.meter())


def _make_room(session: ChatSession, console: Console, text: str) -> bool:
    needed = session.needed_for(text)
    if needed <= session.window:
        return True
    msg = (f"This turn needs {needed:,} tokens (with a {session.max_tokens:,}-token answer budget) "
           f"but the window is {session.window:,}.")
    if not session.droppable_turns():
        console.say(msg + " Dropping old turns would not help: /clear, shorten the message, "
                    "or restart with a larger --preset.")
        return False
    if not console.interactive:
        console.say(msg + " Message not sent; nothing was dropped. Use /clear or a larger --preset.")
        return False
    console.say(msg + "\n  [d] drop the oldest turns (keeps the system prompt and attached documents)"
                      "\n  [c] cancel this message\n  /clear forgets everything but the system prompt")
    answer = (console.read("choice [d/c]: ") or "c").strip().lower()
    if answer.startswith("d"):
        dropped = session.drop_oldest_until_fits(text)
        if session.needed_for(text) > session.window:
            console.say(f"Dropped {dropped} turns, and it still does not fit; message not sent.")
            return False
        console.say(f"Dropped the {dropped} oldest turn(s).")
        return True
    console.say("Cancelled; the conversation is unchanged.")
    return False


def _user_path(arg: str) -> Path:
    try:
        return Path(arg).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise InputError(f"{arg}: no such user's home directory.") from None


def _command(session: ChatSession, console: Console, line: str) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            console.say(HELP)
        elif name == "/clear":
            session.clear()
            console.say("Conversation cleared.")
        elif name == "/stats":
            console.say(session.stats_text())
        elif name in ("/read", "/save", "/load") and not arg:
            console.say(f"Usage: {name} FILE")
        elif name == "/read":
            n = session.attach(_user_path(arg))
            console.say(f"Attached {arg} ({n:,} tokens). {session.meter()}")
            if session.used_tokens() > session.window:
                console.say("Warning: the conversation no longer fits the window; /clear or use a larger --preset.")
        elif name == "/save":
            session.save(_user_path(arg))
            console.say(f"Saved to {arg}.")
        elif name == "/load":
            session.load(_user_path(arg))
            console.say(f"Loaded {len(session.messages)} messages. {session.meter()}")
        else:
            console.say(f"Unknown command {name}; /help lists them.")
    except LocalctxError as exc:
        console.say(f"Error: {exc}")
    except (OSError, ValueError) as exc:  # not a bug but the world (a path, a file): the session goes on
        console.say(f"Error: {name}: {exc}")
    return None
