"""Write docs/reference.md from the Click commands themselves, so the reference cannot drift from --help.

    python scripts/gen_reference.py           # rewrite docs/reference.md
    python scripts/gen_reference.py --check   # exit 1 if docs/reference.md is stale

tests/test_docs.py runs the same check.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
# Fixed so the file does not depend on the terminal of whoever ran the generator.
WIDTH = 100


def walk(cmd: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    """The command and every subcommand below it, depth first, sorted by name."""
    yield cmd, ctx
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            # A child context, as Click builds for `localctx NAME --help`: it inherits the group's
            # settings (-h as well as --help, the width) and gives the full command path in Usage.
            yield from walk(sub, click.Context(sub, parent=ctx, info_name=name, **sub.context_settings))


def render() -> str:
    from localctx.cli import cli
    from localctx.commands import register

    register(cli)
    root = click.Context(cli, info_name="localctx", terminal_width=WIDTH, max_content_width=WIDTH,
                         **cli.context_settings)
    sections = []
    for cmd, ctx in walk(cli, root):
        text = "\n".join(line.rstrip() for line in cmd.get_help(ctx).splitlines())
        sections.append(f"## {ctx.command_path}\n\n```text\n{text}\n```\n")
    header = ("# Command reference\n\n"
              "Every command's `--help`, generated from the Click commands by `scripts/gen_reference.py`.\n"
              "Do not edit by hand: after changing a command, run `python scripts/gen_reference.py`.\n")
    return header + "\n" + "\n".join(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale; write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else None
        if current != text:
            print(f"{REFERENCE} is stale: run `python scripts/gen_reference.py`", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
