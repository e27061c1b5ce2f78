"""Shared fixtures: the real default model, the shared corpus, an isolated user directory, and a
CLI runner that runs the real `localctx` in a subprocess (so exit codes and stderr are real)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from localctx.gguf_meta import ModelFacts, read_facts
from localctx.paths import CACHE_DIR_ENV, USER_DIR_ENV, default_model_path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def facts(model_path: Path) -> ModelFacts:
    return read_facts(model_path)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "alice.txt").is_file():
        pytest.fail(f"the shared corpus is missing at {CORPUS}; tests need ../shared/corpus beside the repo")
    return CORPUS


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("localctx-home")
    monkeypatch.setenv(USER_DIR_ENV, str(home))
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)  # e.g. exported by the benchmark runner
    return home


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli():
    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 900) -> Result:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "localctx", *args], input=input, capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=REPO)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def assert_clean_error(result: Result, *fragments: str) -> None:
    """A user mistake: non-zero exit, a message naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("Error:") or "Error" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
