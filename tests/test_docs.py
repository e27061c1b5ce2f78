"""The documentation against the real CLI: the generated reference is current, and every `localctx`
command line shown in README.md and docs/*.md parses. No model is loaded; this runs in seconds."""
from __future__ import annotations

import copy
import re
import runpy
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import click
import pytest

from conftest import REPO

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "<&", "&>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MENTIONS_LOCALCTX = re.compile(r"(^|[\s|;&/])localctx(\s|$)")


@cache
def localctx_cli() -> click.Group:
    from localctx.cli import cli
    from localctx.commands import register

    register(cli)
    return cli


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each fenced block in a shell language or none."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[:3]):
            end += 1
        if language.lower() in SHELL_LANGUAGES:
            yield i + 2, lines[i + 1:end]
        i = end + 1


def command_lines(block: list[str], first_line: int) -> Iterator[tuple[int, str]]:
    """(line number, command) for each command in a block. Where the block uses `$ ` prompts, only
    those lines are commands and the rest is output; otherwise every line is a command."""
    prompted = any(line.lstrip().startswith("$ ") for line in block)
    logical: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(block, first_line):
        start, text = pending if pending else (number, "")
        text += line
        if line.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        logical.append((start, text.strip()))
    if pending:
        logical.append((pending[0], pending[1].strip()))
    for number, line in logical:
        if prompted:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        yield number, line


def strip_comment(line: str) -> str:
    """LINE without its shell comment: from a # that starts a word, outside quotes."""
    quote: str | None = None
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quote != "'":
            i += 1  # the escaped character is literal
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line


def localctx_invocations(line: str) -> list[list[str]]:
    """The arguments after `localctx` in each localctx command of a shell line: pipelines, `&&`
    chains, `VAR=value` prefixes, `.venv/bin/localctx` and trailing `# comments` included."""
    line = strip_comment(line)
    if not MENTIONS_LOCALCTX.search(line):
        return []
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # shlex would also end the line at a # inside a word: strip_comment did it
    segments: list[list[str]] = [[]]
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            segments.append([])
        elif token in REDIRECTIONS:
            if segments[-1] and segments[-1][-1].isdigit():  # the 2 of `2> file`
                segments[-1].pop()
            i += 1  # the redirection target is not an argument
        else:
            segments[-1].append(token)
        i += 1
    invocations = []
    for words in segments:
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and (words[0] == "localctx" or words[0].endswith("/localctx")):
            invocations.append(words[1:])
    return invocations


def relaxed(cmd: click.Command) -> click.Command:
    """A copy of CMD whose path parameters take paths that do not exist here: examples name files on
    the reader's machine. Option names, choices, numbers and subcommands are still checked."""
    params = []
    for param in cmd.params:
        if isinstance(param.type, click.Path):
            param = copy.copy(param)
            param.type = copy.copy(param.type)
            param.type.exists = False
            param.type.file_okay = param.type.dir_okay = True
            param.type.readable = param.type.writable = param.type.executable = False
        params.append(param)
    clone = copy.copy(cmd)
    clone.params = params
    return clone


def check_args(args: list[str]) -> None:
    """Parse ARGS (what follows `localctx`) as the CLI would, without running the command.
    Raises click.UsageError (a bad option, value or subcommand) as Click would report it."""
    cmd: click.Command = localctx_cli()
    parent: click.Context | None = None
    name = "localctx"
    while True:
        try:
            ctx = relaxed(cmd).make_context(name, list(args), parent=parent, resilient_parsing=False)
        except click.exceptions.Exit:
            return  # --help or --version: valid, and nothing more is parsed
        if not isinstance(cmd, click.Group):
            return
        # Click 8.2 renamed protected_args (the subcommand name) and deprecated the old name.
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            return
        name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        cmd, parent = sub, ctx


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, line, arguments) for every localctx command shown in a shell block of the docs."""
    found = []
    for path in doc_files():
        for first, block in shell_blocks(path.read_text(encoding="utf-8")):
            for number, line in command_lines(block, first):
                where = f"{path.relative_to(REPO)}:{number}"
                try:
                    invocations = localctx_invocations(line)
                except ValueError as exc:  # e.g. an unclosed quote
                    pytest.fail(f"{where}: cannot split `{line}`: {exc}")
                found.extend((where, line, args) for args in invocations)
    return found


def test_reference_is_current():
    render = runpy.run_path(str(REPO / "scripts" / "gen_reference.py"))["render"]
    reference = REPO / "docs" / "reference.md"
    assert reference.is_file() and reference.read_text(encoding="utf-8") == render(), \
        "docs/reference.md is stale: run `python scripts/gen_reference.py`"


def test_every_documented_command_line_parses():
    commands = documented_commands()
    # Guards the extraction itself: the README's quickstart and the docs' examples must be found.
    assert len(commands) >= 10, commands
    assert any(args[:1] == ["chat"] and where.startswith("README.md") for where, _, args in commands)
    failures = []
    for where, line, args in commands:
        try:
            check_args(args)
        except click.UsageError as exc:
            failures.append(f"{where}: `{line}`: {exc.format_message()}")
    assert not failures, "documented command lines the CLI rejects:\n" + "\n".join(failures)


def test_the_checker_can_fail():
    for line in ["localctx generate --no-such-option", "localctx no-such-command", "localctx presets nope",
                 "localctx eval ppl --device tpu", "localctx convert only-one.gguf --preset yarn-32k"]:
        (args,) = localctx_invocations(line)
        with pytest.raises(click.UsageError):
            check_args(args)
    # Files named in examples need not exist here.
    check_args(["convert", "missing.gguf", "out.gguf", "--preset", "yarn-32k", "--verify-text", "missing.txt"])
    check_args(["summarize", "missing.txt", "--prompt-file", "missing.txt"])
    check_args(["generate", "--help"])


def test_extraction_of_command_lines():
    text = "\n".join([
        "```bash",
        "localctx inspect model.gguf#1 --json --prompt 'not # a comment'   # a comment",
        "printf 'hi\\n' | .venv/bin/localctx chat --preset yarn-32k && echo done",
        "LOCALCTX_MEMORY_LIMIT=850M localctx generate \\",
        "    --preset yarn-32k \"hi there\" 2> err.txt",
        "pip install localctx",
        "```",
        "```",
        "$ localctx doctor",
        "localctx              0.1.0",
        "```",
        "```toml",
        "localctx = 1",
        "```",
    ])
    found = [args for first, block in shell_blocks(text) for _, line in command_lines(block, first)
             for args in localctx_invocations(line)]
    assert found == [["inspect", "model.gguf#1", "--json", "--prompt", "not # a comment"], ["chat", "--preset", "yarn-32k"],
                     ["generate", "--preset", "yarn-32k", "hi there"], ["doctor"]]


def test_readme_links_every_docs_page_and_relative_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"README.md's Documentation list should link {unlinked}"
    broken = []
    for path in doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            file = target.split("#", 1)[0]
            if file and "://" not in file and not (path.parent / file).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
