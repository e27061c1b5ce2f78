"""Reading documents as text: plain text, Markdown and source code natively; PDF and HTML through
optional extras. Encodings: UTF-8 first, then cp1252, then Latin-1 (which never fails).

Only regular files are read (a FIFO or a device is refused, see `files`), and at most
MAX_DOCUMENT_BYTES of text (MAX_PDF_BYTES of PDF): 64 MiB of text is some 16 million tokens, four
times the largest window a preset allows, so the bound only stops runaway inputs."""
from __future__ import annotations

import io
from pathlib import Path

from .errors import InputError
from .files import read_limited

PDF_SUFFIXES = {".pdf"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_FALLBACK_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")
MAX_DOCUMENT_BYTES = 64 * 2**20
MAX_PDF_BYTES = 256 * 2**20  # PDFs carry fonts and images besides their text


def decode_text(data: bytes) -> str:
    """Bytes as text with the fallback encodings; never fails (Latin-1 decodes anything)."""
    for encoding in _FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1", errors="replace")  # pragma: no cover - latin-1 decodes anything


def decode_bytes(data: bytes, name: str = "input") -> str:
    """A document's text; refuses binary data (NUL bytes near the start)."""
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} looks like a binary file (it contains NUL bytes); skipped.")
    return decode_text(data)


def read_text(path: Path) -> str:
    """The text of a document; raises InputError with the reason when it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _read_pdf(path)
    text = decode_bytes(read_limited(path, MAX_DOCUMENT_BYTES, InputError, "document"), str(path))
    if suffix in HTML_SUFFIXES:
        return _html_to_text(text, path)
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise InputError(f"{path}: reading PDF needs the 'pdf' extra: pip install 'localctx[pdf]'") from None
    data = read_limited(path, MAX_PDF_BYTES, InputError, "PDF document")
    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as exc:  # pypdf raises many types for broken files
        raise InputError(f"{path}: not a readable PDF ({exc})") from None


def _html_to_text(html: str, path: Path) -> str:
    try:
        import trafilatura
    except ImportError:
        raise InputError(f"{path}: reading HTML needs the 'html' extra: pip install 'localctx[html]'") from None
    text = trafilatura.extract(html, include_comments=False, include_tables=True)
    if not text:
        raise InputError(f"{path}: no readable text found in the HTML.")
    return text
