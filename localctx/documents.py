"""Reading documents as text: plain text, Markdown and source code natively; PDF and HTML through
optional extras. Encodings: UTF-8 first, then cp1252, then Latin-1 (which never fails)."""
from __future__ import annotations

from pathlib import Path

from .errors import InputError

PDF_SUFFIXES = {".pdf"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_FALLBACK_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


def decode_bytes(data: bytes, name: str = "input") -> str:
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} looks like a binary file (it contains NUL bytes); skipped.")
    for encoding in _FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InputError(f"{name}: cannot decode the text.")  # pragma: no cover - latin-1 decodes anything


def read_text(path: Path) -> str:
    """The text of a document; raises InputError with the reason when it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in PDF_SUFFIXES:
            return _read_pdf(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"File not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; pass a file.") from None
    except PermissionError:
        raise InputError(f"Cannot read {path}: permission denied.") from None
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}") from None
    text = decode_bytes(data, str(path))
    if suffix in HTML_SUFFIXES:
        return _html_to_text(text, path)
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise InputError(f"{path}: reading PDF needs the 'pdf' extra: pip install 'localctx[pdf]'") from None
    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except FileNotFoundError:
        raise InputError(f"File not found: {path}") from None
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
