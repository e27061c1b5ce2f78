"""The batch's inputs and outputs: paths expanded to sources, each source's output file (proven
inside --out), and the documents read from them."""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from ..documents import MAX_DOCUMENT_BYTES, decode_bytes, read_text
from ..errors import InputError, LocalctxError
from ..files import read_stream
from ..summary_store import sha256_text
from .options import Document, Source

_GLOB_CHARS = set("*?[")


def expand_inputs(args: Sequence[str], exclude: Path | None = None) -> list[Source]:
    """Files, directories (recursively, hidden entries skipped), glob patterns and '-' (stdin).
    A missing path or a pattern matching nothing is an error before any work starts."""
    if not args:
        raise InputError("Give at least one PATH (a file, a directory, a glob pattern, or - for stdin).")
    sources: list[Source] = []
    for arg in args:
        if arg == "-":
            sources.append(Source("-", None, Path("stdin.md")))
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            sources += _walk(path, exclude)
        elif path.exists():
            sources.append(Source(arg, path, _out_name(path)))
        elif _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"No files match {arg}")
            for m in matches:
                p = Path(m)
                sources += _walk(p, exclude) if p.is_dir() else [Source(m, p, _out_name(p))]
        else:
            raise InputError(f"Path not found: {arg}")
    return _dedupe_out_names(sources)


def _walk(directory: Path, exclude: Path | None) -> list[Source]:
    skip = exclude.resolve() if exclude else None
    files = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue  # .git, .localctx-cache and the like
        if skip and (p.resolve() == skip or skip in p.resolve().parents):
            continue  # our own output directory inside an input directory
        files.append(p)
    if not files:
        raise InputError(f"{directory} contains no files to summarize.")
    base = _out_name(directory)
    return [Source(str(p), p, base / p.relative_to(directory)) for p in files]


def _out_name(path: Path) -> Path:
    """The name of an input under --out, made of plain components only (see output_path): a plain
    relative path is mirrored (docs/a.txt → docs/a.txt); any other (absolute, with '..', '.') is
    named by its last component, read from the path as given, so a symbolic link is named by the
    link and '..' by the directory it stands for. The root directory has no name: its files are
    named by their paths below it."""
    if not path.is_absolute() and ".." not in path.parts:
        return path
    return Path(Path(os.path.abspath(path)).name)


def _dedupe_out_names(sources: list[Source]) -> list[Source]:
    seen: set[Path] = set()
    unique = list({s.label: s for s in sources}.values())  # a file named twice is summarized once
    for s in unique:
        name = s.out_name.with_suffix(".md")
        if name in seen:  # a.txt and a.py: keep both suffixes
            name = s.out_name.with_name(s.out_name.name + ".md")
        n = 2
        while name in seen:
            name = s.out_name.with_name(f"{s.out_name.name}-{n}.md")
            n += 1
        seen.add(name)
        s.out_name = name
    return unique


def output_path(out: Path, source: Source, taken: set[Path], inputs: set[Path]) -> Path:
    """Where `source`'s Markdown goes: OUT/<its out_name>, PROVEN inside OUT: the name has no
    absolute or '..' part, and the directory it lands in, with every symbolic link on the way
    resolved, is OUT or below it. It is never an input of the batch (a.md summarized into its own
    directory becomes a.summary.md) nor a file another source of the batch already writes
    (`taken`, resolved paths; the chosen one is added)."""
    name = source.out_name
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise LocalctxError(f"Bug: unsafe output name {name} for {source.label}.")
    candidates = [name, name.with_suffix(".summary.md"),
                  *(name.with_suffix(f".summary-{n}.md") for n in range(2, len(taken) + 3))]
    for candidate in candidates:
        target = out / candidate
        real = resolved_inside(out, target)
        if real not in taken and real not in inputs:
            taken.add(real)
            return target
    raise LocalctxError(f"Bug: no free output name for {source.label}.")  # pragma: no cover - len(taken)+2 candidates


def resolved_inside(out: Path, target: Path) -> Path:
    """`target` with its directory's symbolic links resolved (not its own: a link at `target` is
    replaced by the write, not followed); raises unless that directory is OUT or below it."""
    try:
        root, where = out.resolve(), target.parent.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of symbolic links
        raise InputError(f"Cannot check where {target} leads: {exc}") from None
    if where != root and root not in where.parents:
        raise InputError(f"Refusing to write {target}: {target.parent} leads outside --out {out} (to {where}) "
                         "through a symbolic link. Remove the link or use another --out.")
    return where / target.name


def output_paths(out: Path, sources: Sequence[Source]) -> dict[str, Path]:
    """Each source's output file by label (see output_path); raises before any work if one cannot be."""
    inputs = {s.path.resolve() for s in sources if s.path is not None}
    taken: set[Path] = set()
    return {s.label: output_path(out, s, taken, inputs) for s in sources}


def read_documents(sources: Iterable[Source], stdin: IO[bytes] | None,
                   warn: Callable[[str], None]) -> tuple[list[Document], list[dict[str, Any]]]:
    """Read every source; an unreadable, binary or empty one becomes a 'skipped' record."""
    docs, skipped = [], []
    for s in sources:
        try:
            text = _read(s, stdin)
            if not text.strip():
                raise InputError(f"{s.label} is empty; skipped.")
        except InputError as exc:
            message = str(exc)
            warn(message)
            skipped.append({"path": s.label, "sha256": None, "status": "skipped", "error": message})
            continue
        docs.append(Document(s, text, sha256_text(text)))
    return docs, skipped


def _read(source: Source, stdin: IO[bytes] | None) -> str:
    if source.path is None:
        if stdin is None:
            raise InputError("- means stdin, but no stdin was given.")
        return decode_bytes(read_stream(stdin, MAX_DOCUMENT_BYTES), "stdin")
    return read_text(source.path)
