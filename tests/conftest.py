"""Shared fixtures: the real default model (and engines loaded once per session), the shared
corpus, an isolated user directory, the two ways every test runs the CLI: `invoke` (fixture `cli`)
in-process (Click's runner: the real commands, parsing and error boundary, without a new
interpreter and model load per call) and `run_localctx` (fixture `run_cli`) in a real subprocess,
for what only a process shows (exit codes of signals, import order, llama.cpp's own writes to file
descriptors, stdin bytes, resource limits), and `assert_clean_error`, the one check of a refusal."""
from __future__ import annotations

import localctx.engine  # noqa: F401  llama.cpp before numpy, as the CLI does (localctx/cli.py)

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from localctx.cli import cli as cli_group
from localctx.commands import register
from localctx.engine import Engine
from localctx.gguf_meta import ModelFacts, read_facts
from localctx.paths import CACHE_DIR_ENV, USER_DIR_ENV, default_model_path
from localctx.runtime import RunSpec, open_engine

register(cli_group)

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


@pytest.fixture(scope="session")
def native_engine() -> Iterator[Engine]:
    """The default model at its trained 8,192-token window, shared by every test that does not
    depend on how it was loaded (tests that generate leave the KV cache to the next: the engine
    reuses or replaces it, as it does between calls of one batch)."""
    with open_engine(RunSpec(preset="native")) as engine:
        yield engine


@pytest.fixture(scope="session")
def small_engine() -> Iterator[Engine]:
    """The default model at a 512-token window, for overflow handling without long prompts."""
    with open_engine(RunSpec(preset="auto", ctx=512)) as engine:
        yield engine


SHORT_TRAINED = 1024


@pytest.fixture(scope="session")
def short_model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's weights under a header that says it was trained on 1,024 tokens: the
    real model, with a trained window small enough that crossing it (and `auto`'s ladder:
    1,024 → 2,048 → 4,096) costs seconds, not minutes."""
    from gguf import Keys

    from localctx.convert import override_metadata, plan_conversion, write_converted
    from localctx.gguf_meta import arch_key

    plan = plan_conversion(model_path, "native")
    out = tmp_path_factory.mktemp("short") / "smollm2-trained-1k.gguf"
    write_converted(override_metadata(plan, {arch_key(Keys.LLM.CONTEXT_LENGTH, "llama"): SHORT_TRAINED}), out)
    return out


def invoke(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    """Run `localctx ARGS...` in this process; an exception the error boundary let through fails
    the test with its traceback (a user must never see one)."""
    result = CliRunner().invoke(cli_group, list(args), input=input, env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli():
    return invoke


def run_localctx(*args: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
                 timeout: float = 900, preexec_fn: Callable[[], None] | None = None) -> Result:
    """Run `python -m localctx ARGS...` in a real process from the repository root, with this
    environment and `env` over it; stdin may be bytes (undecodable ones too), and output is decoded
    as UTF-8 with replacement so that a stray byte fails an assertion, not the runner."""
    proc = subprocess.run([sys.executable, "-m", "localctx", *args], capture_output=True, timeout=timeout, cwd=REPO,
                          input=input.encode() if isinstance(input, str) else input,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


@pytest.fixture
def run_cli():
    return run_localctx


def assert_clean_error(result: Result, *fragments: str, code: int | None = None) -> None:
    """A user mistake, refused cleanly: a non-zero exit (exactly `code` when given), an `Error:`
    line, every fragment in stderr, no traceback. (In-process, `invoke` has already failed the test
    on any exception the error boundary let through.)"""
    if code is None:
        assert result.returncode != 0, (result.stdout, result.stderr)
    else:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith("Error:") for line in result.stderr.splitlines()), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
