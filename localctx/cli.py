"""Command-line interface: thin commands that parse options, call one library function, render.
This module is the single error boundary: LocalctxError becomes a clean message and exit code 1."""
from __future__ import annotations

import sys
from typing import Any

import click

from .errors import LocalctxError
from .version import __version__


class LocalctxGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LocalctxError as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            sys.stderr.close()  # e.g. `localctx ... | head`: not an error worth a traceback
            ctx.exit(0)


@click.group(cls=LocalctxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="localctx")
def cli() -> None:
    """Run GGUF models beyond their trained context window, and measure what it costs.

    \b
    Example:
      localctx chat --preset yarn-32k
    """


# Commands that run llama.cpp load it before anything imports numpy (gguf does): on a CUDA build
# under a PyTorch virtualenv (numpy 2.5) llama.cpp's tokenizer segfaulted whenever numpy's shared
# libraries had been loaded first, and loading llama.cpp first avoided it (benchmarks/RESULTS.md).
MODEL_COMMANDS = frozenset({"chat", "generate", "summarize", "eval", "tune", "doctor", "serve"})


def runs_llama(argv: list[str]) -> bool:
    """Whether this command line will load llama.cpp (convert only checks its output with --verify)."""
    if not argv:
        return False
    return "--verify" in argv if argv[0] == "convert" else argv[0] in MODEL_COMMANDS


def main(argv: list[str] | None = None, prog_name: str = "localctx") -> None:
    """The `localctx` command (and scripts/convert_gguf.py, which is `localctx convert`)."""
    args = sys.argv[1:] if argv is None else argv
    if runs_llama(args):
        from . import engine  # noqa: F401
    from .commands import register

    register(cli)
    cli(args=args, prog_name=prog_name)
