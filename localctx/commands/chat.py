"""The interactive chat command."""
from __future__ import annotations

import sys

import click

from ..options import run_options
from ..runtime import RunSpec


def _reader(interactive: bool):
    def read(prompt: str) -> str | None:
        try:
            if interactive:
                return input(prompt)
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        except EOFError:
            return None

    return read


@click.command()
@click.option("-s", "--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True, help="Answer budget per turn.")
@click.option("-t", "--temperature", type=click.FloatRange(0), default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@run_options()
def chat(spec: RunSpec, system: str | None, max_tokens: int, temperature: float, seed: int) -> None:
    """Chat with a model in its own chat template, at a context extended by a preset.

    Type /help inside for commands (/read FILE, /stats, /save, /load, /clear, /exit).
    Piped input works too: each line is one message.

    \b
    Examples:
      localctx chat --preset yarn-32k
      printf 'hi\\n' | localctx chat
    """
    from ..chat import ChatSession, Console, run_repl
    from ..runtime import open_engine

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with open_engine(spec, seed=seed) as engine:
        session = ChatSession(engine, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed)
        run_repl(session, Console(_reader(interactive), sys.stdout, sys.stderr, interactive))


def register(group: click.Group) -> None:
    group.add_command(chat)
