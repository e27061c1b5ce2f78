"""The interactive chat command."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import click

from ..documents import MAX_DOCUMENT_BYTES, decode_text
from ..errors import InputError
from ..options import run_options, seed_option
from ..runtime import RunSpec

MAX_LINE_BYTES = MAX_DOCUMENT_BYTES


def _reader(interactive: bool) -> Callable[[str], str | None]:
    """How the REPL reads a line: input() on a terminal (line editing), else the raw bytes of
    stdin. Either way bytes that are not UTF-8 are decoded with the documents' fallbacks
    (cp1252, Latin-1) instead of raising."""
    if interactive:
        _tolerate_undecodable(sys.stdin)

        def read(prompt: str) -> str | None:
            try:
                return _redecode(input(prompt))
            except EOFError:
                return None

        return read
    stream = getattr(sys.stdin, "buffer", None)

    def read_piped(prompt: str) -> str | None:
        if stream is None:  # a text-only stdin (embedding): already decoded
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return None
        if len(raw) > MAX_LINE_BYTES:
            raise InputError(f"A line on stdin is longer than {MAX_LINE_BYTES // 2**20} MiB; "
                             "attach long text with /read FILE instead.")
        return decode_text(raw).removesuffix("\n").removesuffix("\r")

    return read_piped


def _tolerate_undecodable(stream: TextIO) -> None:
    # input() decodes with stdin's own error handler: make undecodable bytes survive as
    # surrogates, which _redecode turns back into bytes and decodes with the fallbacks.
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def _redecode(line: str) -> str:
    if not any("\udc80" <= c <= "\udcff" for c in line):
        return line
    return decode_text(line.encode(sys.stdin.encoding or "utf-8", "surrogateescape"))


@click.command()
@click.option("-s", "--system", help="System prompt.")
@click.option("-f", "--file", "files", multiple=True, type=click.Path(path_type=Path),
              help="Attach a document before the first message, as /read does (repeatable).")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True, help="Answer budget per turn.")
@click.option("-t", "--temperature", type=click.FloatRange(0), default=0.7, show_default=True)
@seed_option
@run_options(kv_cache=True)
def chat(spec: RunSpec, system: str | None, files: tuple[Path, ...], max_tokens: int, temperature: float,
         seed: int) -> None:
    """Chat with a model in its own chat template, at a context extended by a preset.

    Type /help inside for commands (/read FILE, /stats, /save, /load, /clear, /exit).
    Piped input works too: each line is one message. A long attached document is saved as a KV
    snapshot, so a new chat about it starts in seconds (see `localctx cache`).

    \b
    Examples:
      localctx chat --preset yarn-32k
      localctx chat --preset auto --file report.txt
      printf 'hi\\n' | localctx chat
    """
    from ..chat import ChatSession, Console, Message, run_repl
    from ..memory import GENERATE
    from ..runtime import open_engine

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with open_engine(spec, seed=seed, workload=GENERATE) as engine:
        session = ChatSession(engine, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed)
        # A chat template that cannot render fails here, with a clean error, before the first prompt.
        session.tokens_for(session.messages + [Message("user", "Hello.")])
        for path in files:
            n = session.attach(path)
            click.echo(f"Attached {path} ({n:,} tokens).", err=True)
        run_repl(session, Console(_reader(interactive), sys.stdout, sys.stderr, interactive))


def register(group: click.Group) -> None:
    group.add_command(chat)
