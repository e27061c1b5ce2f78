"""Errors whose messages a user can act on. The CLI prints them without a traceback."""
from __future__ import annotations


class LocalctxError(Exception):
    """Base class: `str(err)` is the whole user-facing message."""

    exit_code = 1


class ModelFileError(LocalctxError):
    """A model path that is missing, unreadable or not a well-formed GGUF file."""


class PresetError(LocalctxError):
    """An unknown preset, a malformed preset file, or a preset that cannot apply to a model."""


class ResourceError(LocalctxError):
    """Too little memory, or a device the llama.cpp build cannot use."""


class ContextOverflowError(LocalctxError):
    """A prompt that does not fit the resolved context window."""


class ConversionError(LocalctxError):
    """A GGUF conversion that was refused or failed (input left untouched)."""


class InputError(LocalctxError):
    """A document or text input that cannot be read."""


class Cancelled(LocalctxError):
    """A request stopped before it finished: its client went away, or the server is stopping."""


class Interrupted(LocalctxError):
    """Ctrl-C during a batch: everything finished so far is saved."""

    exit_code = 130

    def __init__(self, message: str = "Interrupted. Finished documents and chunk summaries are saved; "
                                      "run the same command again to resume.") -> None:
        super().__init__(message)
