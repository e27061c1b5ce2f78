"""The chat session in-process with the real model and a fake console (scripted input)."""
from __future__ import annotations

import io

import pytest

from localctx.chat import ChatSession, Console, Message, run_repl
from localctx.errors import ContextOverflowError


def scripted(lines: list[str], interactive: bool = True) -> tuple[Console, io.StringIO, io.StringIO]:
    feed = iter(lines)
    out, err = io.StringIO(), io.StringIO()
    return Console(lambda prompt: next(feed, None), out, err, interactive), out, err


def test_drop_oldest_turns_keeps_system_and_documents(small_engine, tmp_path):
    doc = tmp_path / "fact.txt"
    doc.write_text("The secret word is pineapple.")
    session = ChatSession(small_engine, system="Be brief.", max_tokens=48, temperature=0)
    run_repl(session, scripted([f"/read {doc}", "Say hi.", "Say hello."])[0])
    pinned = [m for m in session.messages if m.pinned]
    # The smallest message that overflows now; the replies' lengths vary by build, so measure.
    words = next(k for k in range(8, 512, 4) if session.needed_for("word " * k) > session.window)
    message = "word " * words
    assert len(session.tokens_for(pinned + [Message("user", message)])) + 48 <= session.window
    console, out, err = scripted([message, "d", "/stats"])
    run_repl(session, console)
    log = err.getvalue()
    assert "[d] drop the oldest turns" in log and "Dropped the" in log
    roles = [m.role for m in session.messages]
    assert roles[0] == "system" and session.messages[0].content == "Be brief."
    assert any("pineapple" in m.content for m in session.messages if m.pinned)
    assert not any(m.content == "Say hi." for m in session.messages)
    assert session.messages[-2].content == message
    assert session.used_tokens() <= session.window


def test_cancel_keeps_conversation(small_engine):
    session = ChatSession(small_engine, max_tokens=48, temperature=0)
    console, out, err = scripted(["Say hi.", "word " * 440, "c"])
    run_repl(session, console)
    assert "Cancelled" in err.getvalue()
    assert [m.content for m in session.messages if m.role == "user"] == ["Say hi."]


def test_multiline_and_clear(small_engine):
    session = ChatSession(small_engine, system="Be brief.", max_tokens=16, temperature=0)
    console, out, err = scripted(['"""', "line one", "line two", '"""', "/clear", "/exit"])
    run_repl(session, console)
    assert "Conversation cleared." in err.getvalue()
    assert [m.role for m in session.messages] == ["system"]


def test_interrupted_reply_keeps_partial_text(small_engine):
    session = ChatSession(small_engine, max_tokens=64, temperature=0)
    written: list[str] = []

    def write(chunk: str) -> None:
        written.append(chunk)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.reply("Tell me a story about a cat.", write)
    assert session.messages[-1].role == "assistant"
    assert session.messages[-1].content == "".join(written).strip()
    assert session.stats.turns == 1


def test_ask_returns_the_reply_and_refuses_what_does_not_fit(small_engine):
    session = ChatSession(small_engine, max_tokens=24, temperature=0)
    reply = session.ask("What is the capital of France?")
    assert reply.strip() and session.messages[-1] == Message("assistant", reply)
    before = list(session.messages)
    with pytest.raises(ContextOverflowError, match="window of 512"):
        session.ask("word " * 600)
    assert session.messages == before  # nothing sent, nothing dropped
