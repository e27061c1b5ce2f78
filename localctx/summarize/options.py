"""What a summary batch is asked and what it reports: the options, the documents, the records and
statistics, the progress callbacks, and the keys finished work is stored under."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..identity import model_identity
from ..params import result_params
from ..summary_store import sha256_text

# The default fits any document (a report, code, meeting notes); `fiction` asks for a story's people.
PROMPTS = {
    "general": "Summarize the following text in a few sentences. Say what it is about and state its main points.",
    "fiction": "Summarize the following text in a few sentences. Name the main characters and say what happens.",
}
DEFAULT_PROMPT = PROMPTS["general"]
# With an adaptive (`auto`) engine, a document past the trained context is summarized in one pass
# while that needs at most this scale factor, else map-reduced over unscaled chunks: measured on
# this project's CPU in benchmarks/RESULTS.md (summarize planner).
ONE_PASS_MAX_SCALE = 2.0
REDUCE_NOTE = ("The text below is a series of summaries of consecutive parts of one document. "
               "Combine them into a single summary of the whole document.")
STRATEGIES = ("auto", "stuff", "map-reduce")
STORE_VERSION = 2  # bump when prompts or record layout change, so old results are not reused
REPEAT_PENALTY = 1.1  # a 135M model at temperature 0 loops without it


# --- Options and records -----------------------------------------------------------------------


@dataclass(frozen=True)
class SummarizeOptions:
    strategy: str = "auto"
    chunk_tokens: int | None = None  # map chunk size; None: fill the window
    overlap: int = 0  # tokens shared by neighbouring chunks
    max_summary_tokens: int = 256  # the answer budget of every call
    prompt: str = DEFAULT_PROMPT
    retry_failed: bool = False
    temperature: float = 0.0
    seed: int = 0
    repeat_penalty: float = REPEAT_PENALTY
    one_pass_max_scale: float = ONE_PASS_MAX_SCALE  # auto engines: see ONE_PASS_MAX_SCALE
    parallel: int = 1  # model calls at once, as sequences of one batch (answers do not depend on it)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"Unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}.")
        if not self.prompt.strip():
            raise InputError("The summary prompt is empty.")
        if self.chunk_tokens is not None and self.overlap >= self.chunk_tokens // 2:
            raise InputError(f"--overlap {self.overlap} must be less than half of --chunk-tokens {self.chunk_tokens}.")


@dataclass
class Source:
    """One input: a file path, or stdin (path None)."""

    label: str  # the path as the user sees it; "-" for stdin
    path: Path | None
    out_name: Path  # where its Markdown goes, relative to --out


@dataclass
class Document:
    source: Source
    text: str
    sha256: str

    @property
    def label(self) -> str:
        return self.source.label


@dataclass
class BatchStats:
    documents: int = 0
    summarized: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    model_calls: int = 0  # calls actually run in this batch (cached calls are not counted)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    model_loaded: bool = False
    seconds: float = 0.0
    workers: int = 0  # cluster workers that ran the batch (0: this process)
    retried: int = 0  # cluster tasks run again after their worker died

    def add(self, info: dict[str, Any]) -> None:
        """Count one model call actually run."""
        self.model_calls += 1
        self.prompt_tokens += info["prompt_tokens"]
        self.generated_tokens += info["generated_tokens"]

    def merge(self, other: BatchStats) -> None:
        self.model_calls += other.model_calls
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens


@dataclass
class BatchResult:
    records: list[dict[str, Any]]
    stats: BatchStats
    out_files: list[Path] = field(default_factory=list)


class Reporter:
    """Progress callbacks; this base class reports nothing (see summarize_progress)."""

    def batch_start(self, documents: int, done: int, pending_tokens: int, pending_chunks: int) -> None: ...
    def doc_start(self, index: int, total: int, label: str, strategy: str, tokens: int, chunks: int) -> None: ...
    def call_done(self, info: dict[str, Any], doc_tokens_done: int) -> None: ...
    def doc_done(self, record: dict[str, Any], cached: bool) -> None: ...
    def warn(self, message: str) -> None: ...
    def cluster_progress(self, done: int, total: int, tokens: int, seconds: float, workers: int) -> None:
        """On a cluster: `done` of `total` documents finished, `tokens` (prompt + generated) computed
        by `workers` workers in `seconds`."""
    def batch_done(self, stats: BatchStats) -> None: ...
    def close(self) -> None: ...

# --- Keys --------------------------------------------------------------------------------------


def fingerprint(facts: Any, ladder: Any, options: SummarizeOptions) -> str:
    """What a model call's output depends on, besides its text: the model file and its chat template
    (which words the prompt; the model's identity samples the file, and may miss an edited template),
    the resolved parameters (every window of an adaptive preset: a call's length picks its window),
    prompt, answer budget and sampling."""
    windows = [result_params(step) for step in ladder.steps]
    settings = windows[0] if len(windows) == 1 else windows
    return sha256_text(json.dumps({
        "version": STORE_VERSION,
        "model": [model_identity(facts.path), sha256_text(facts.chat_template or "")],
        "params": settings,
        "prompt": options.prompt,
        "max_summary_tokens": options.max_summary_tokens,
        "sampling": [options.temperature, options.seed, options.repeat_penalty],
    }, sort_keys=True))


def document_key(fp: str, options: SummarizeOptions, sha256: str) -> str:
    return sha256_text(json.dumps([fp, options.strategy, options.chunk_tokens, options.overlap, sha256]))


def call_key(fp: str, role: str, text: str) -> str:
    return sha256_text(json.dumps([fp, role, text]))
