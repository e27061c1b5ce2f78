"""Batch summarization: documents → (one pass | chunks → map → reduce) over the engine, resumable.

Per document the strategy comes from real token counts: if the instruction, the whole document and
the answer budget fit the window, one pass ("stuff"); otherwise the text is split at natural
boundaries into chunks that fill the window, each chunk is summarized (map), and the partial
summaries are combined, recursively, until one call holds them all (reduce). With an adaptive
(`auto`) engine chunks and reduce calls fill the unscaled window, and one pass is chosen while the
document needs at most ONE_PASS_MAX_SCALE; every call runs at the scaling its own length needs.

Every completed model call and document is saved in a Store keyed by content hash + model +
resolved parameters + prompt + strategy settings, so a re-run skips finished work and a killed
batch resumes where it stopped. The engine is loaded once per batch, and only when something is left to do."""
from __future__ import annotations

import glob
import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .documents import MAX_DOCUMENT_BYTES, decode_bytes, read_text
from .files import read_stream
from .errors import ContextOverflowError, InputError, LocalctxError
from .errors import Interrupted  # noqa: F401  re-exported: callers imported it from here
from .identity import model_identity
from .params import result_params
from .paths import cache_dir, writable_cache
from .runtime import Resolved, RunSpec, resolve_spec
from .executor import Executor, LocalExecutor
from .fsutil import atomic_write, check_output_dir
from .summary_store import JSONL_NAME, Store, markdown, sha256_text, write_jsonl

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
_GLOB_CHARS = set("*?[")


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


# --- Inputs ------------------------------------------------------------------------------------


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


# --- Prompts -----------------------------------------------------------------------------------

_BODY = "\x00BODY\x00"


@dataclass(frozen=True)
class Frame:
    """An instruction rendered with the model's chat template around a body. The fixed part
    (system + instruction) comes first, so llama.cpp's prefix matching evaluates it once per batch
    and every chunk after it reuses that KV state."""

    head: list[int]
    tail: list[int]
    stop: list[str]

    @property
    def overhead(self) -> int:
        return len(self.head) + len(self.tail)

    @classmethod
    def render(cls, engine: Any, instruction: str) -> Frame:
        # The instruction is repeated after the text: past a few thousand tokens a small model
        # loses an instruction it read only at the start and continues the text instead.
        control = engine.control_tokens_in(instruction)
        if control:  # the instruction is tokenized with the template's text, so it must not carry markup
            raise InputError(f"The summary prompt contains {control[0]!r}, a control token of this model's chat "
                             "template; remove it from --prompt / --prompt-file.")
        content = f"{instruction}\n\nText:\n{_BODY}\n\nEnd of the text. {instruction}"
        prompt = engine.format_chat([{"role": "user", "content": content}])
        head, tail = prompt.text.split(_BODY)
        return cls(engine.tokenize(head, add_bos=False, special=True),
                   engine.tokenize(tail, add_bos=False, special=True), prompt.stop)

    def tokens(self, engine: Any, body: str) -> list[int]:
        # The body is tokenized without special tokens: a document cannot inject chat markup.
        return self.head + engine.tokenize(body, add_bos=False, special=False) + self.tail


def _join_parts(parts: Sequence[str]) -> str:
    return "\n\n".join(f"Part {i}:\n{p.strip()}" for i, p in enumerate(parts, 1))


def group_parts(parts: Sequence[str], count: Callable[[str], int], room: int) -> list[list[str]]:
    """Consecutive partial summaries, as many per reduce call as `room` tokens hold (as joined for
    the call). A part too large to share a call gets one of its own."""
    groups: list[list[str]] = [[]]
    for part in parts:
        candidate = groups[-1] + [part]
        if groups[-1] and count(_join_parts(candidate)) > room:
            groups.append([part])
        else:
            groups[-1] = candidate
    return groups


# --- One document ------------------------------------------------------------------------------


@dataclass
class Plan:
    strategy: str
    tokens: int
    chunks: list[str]


@dataclass(frozen=True)
class Call:
    """One model call of a document's summary: a map chunk (or, `whole`, the document in one
    pass) or a reduce group's joined partial summaries. `doc_tokens`: its share of the document,
    for progress."""

    role: str  # map | reduce
    body: str
    whole: bool = False
    doc_tokens: int = 0


@dataclass(frozen=True)
class Group:
    """Partial summaries to split into reduce calls (counting them needs the tokenizer)."""

    parts: tuple[str, ...]


Request = Call | Group
Flow = Generator[list[Request], list[Any], str]


def run_flow(flow: Flow, answer: Callable[[list[Request]], list[Any]]) -> str:
    """Drive a document's flow to its summary, answering each round of requests with `answer`."""
    try:
        requests = next(flow)
        while True:
            requests = flow.send(_raise_failed(answer(requests)))
    except StopIteration as stop:
        return stop.value


def _raise_failed(answers: list[Any]) -> list[Any]:
    """A round's answers, unless a call failed (its error stands in its place): then that error."""
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    return answers


def summary_flow(plan: Plan) -> Flow:
    """A document's summary as the requests it needs, in rounds: each `yield` hands out requests
    that do not depend on each other (every map chunk of a document; every reduce group of a
    level) and receives their answers. One process answers them in order (`Summarizer.summarize`);
    a cluster's driver answers them in parallel. Either way the same calls."""
    if plan.strategy == "stuff":
        [summary] = yield [Call("map", plan.chunks[0], whole=True, doc_tokens=plan.tokens)]
        return summary
    share = plan.tokens // len(plan.chunks)  # progress measured in document tokens
    parts = yield [Call("map", chunk, doc_tokens=share) for chunk in plan.chunks]
    while len(parts) > 1:
        [groups] = yield [Group(tuple(parts))]
        if len(groups) == len(parts):  # cannot happen while reduce_room >= 2 answers; guard anyway
            raise ContextOverflowError("Partial summaries do not shrink enough to combine; use a larger preset.")
        parts = yield [Call("reduce", _join_parts(g)) for g in groups]
    return parts[0]


def document_result(plan: Plan, calls: list[dict[str, Any]], summary: str, seconds: float) -> dict[str, Any]:
    """A finished document's record fields, from its calls (run or cached) and its summary."""
    if not summary.strip():
        raise LocalctxError("the model returned an empty summary.")
    return {"status": "ok", "strategy": plan.strategy, "tokens": plan.tokens, "chunks": len(plan.chunks),
            "model_calls": len(calls), "windows": [c.get("window") for c in calls],
            "seconds": round(seconds, 2), "summary": summary.strip(), "error": None}


def failed_result(plan: Plan | None, message: str) -> dict[str, Any]:
    return {"status": "failed", "strategy": plan.strategy if plan else None,
            "tokens": plan.tokens if plan else None, "chunks": len(plan.chunks) if plan else None,
            "model_calls": 0, "seconds": 0.0, "summary": None, "error": message}


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LocalctxError) else f"{type(exc).__name__}: {exc}"


class Summarizer:
    """Summarizes documents over one loaded engine, reusing and filling the store (a cluster's
    workers only `execute` requests: the driver keeps the store)."""

    def __init__(self, engine: Any, store: Store, options: SummarizeOptions, fp: str, reporter: Reporter) -> None:
        self.engine, self.store, self.options, self.fp, self.reporter = engine, store, options, fp, reporter
        self.map_frame = Frame.render(engine, options.prompt)
        self.reduce_frame = Frame.render(engine, f"{options.prompt}\n{REDUCE_NOTE}")
        # Chunks and reduce calls fill the smallest window (unscaled, with auto); one pass may use
        # up to the largest, and with auto only up to one_pass_max_scale.
        ladder = engine.ladder
        self.window = ladder.top.n_ctx
        self.chunk_window = ladder.bottom.n_ctx
        one_pass = self.window
        if ladder.adaptive:
            one_pass = min(one_pass, int(ladder.bottom.n_ctx * max(1.0, options.one_pass_max_scale)))
        self.room = self._room(self.map_frame, self.chunk_window)
        self.reduce_room = self._room(self.reduce_frame, self.chunk_window)
        self.one_pass_room = self._room(self.map_frame, one_pass)
        self.stats = BatchStats()
        self._doc_tokens_done = 0
        self._check_settings()

    def _room(self, frame: Frame, window: int) -> int:
        return window - frame.overhead - self.options.max_summary_tokens

    def _check_settings(self) -> None:
        n_ctx, budget = self.chunk_window, self.options.max_summary_tokens
        overhead = self.reduce_frame.overhead
        if overhead >= n_ctx:
            raise ContextOverflowError(
                f"The summary prompt alone is {overhead:,} tokens, larger than the {n_ctx:,}-token window "
                f"(preset {self.engine.params.preset}). Shorten --prompt / --prompt-file or use a larger preset."
            )
        # A reduce step must hold at least two partial summaries, or combining never converges.
        if self.reduce_room < 2 * budget:
            raise ContextOverflowError(
                f"The summary prompt takes {overhead:,} tokens and each answer {budget:,}: that leaves "
                f"{max(self.reduce_room, 0):,} tokens of the {n_ctx:,}-token window (preset "
                f"{self.engine.params.preset}) for text, too little to combine two partial summaries. "
                "Shorten --prompt, lower --max-summary-tokens, or use a larger preset."
            )
        chunk = self.options.chunk_tokens
        largest = self._room(self.map_frame, self.window)
        if chunk is not None and chunk > largest:
            raise ContextOverflowError(
                f"--chunk-tokens {chunk:,} does not fit: with the prompt ({self.map_frame.overhead:,} tokens) "
                f"and the answer budget ({budget:,}) the {self.window:,}-token window holds at most {largest:,}."
            )
        if self.options.overlap >= (chunk or self.room) // 2:
            raise InputError(f"--overlap {self.options.overlap} must be less than half the chunk size ({chunk or self.room}).")

    # --- planning --------------------------------------------------------------------------------

    def plan(self, doc: Document) -> Plan:
        tokens = self.engine.count(doc.text)
        fits = tokens <= self.one_pass_room  # never less than the chunk room
        strategy = self.options.strategy
        if strategy == "auto":
            strategy = "stuff" if fits else "map-reduce"
        if strategy == "stuff":
            return Plan("stuff", tokens, [doc.text])
        return Plan("map-reduce", tokens, self._split(doc, tokens))

    def _split(self, doc: Document, tokens: int) -> list[str]:
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        cap = self.options.chunk_tokens or self.room
        # Balance the chunks: ceil(n / cap) chunks of about equal size summarize more evenly than
        # full chunks and a small remainder, and cost the same number of calls.
        k = max(1, math.ceil(tokens / max(1, cap - self.options.overlap)))
        target = min(cap, math.ceil(tokens / k) + self.options.overlap)
        capacity = (max(1, int(target * 0.9)), cap)
        markdown_like = doc.source.path is not None and doc.source.path.suffix.lower() in (".md", ".markdown")
        splitter_cls = MarkdownSplitter if markdown_like else TextSplitter
        splitter = splitter_cls.from_callback(self.engine.count, capacity, overlap=self.options.overlap)
        return [c for c in splitter.chunks(doc.text) if c.strip()]

    # --- running ---------------------------------------------------------------------------------

    def summarize(self, doc: Document, plan: Plan, index: int, total: int) -> dict[str, Any]:
        self.reporter.doc_start(index, total, doc.label, plan.strategy, plan.tokens, len(plan.chunks))
        start = time.perf_counter()
        calls: list[dict[str, Any]] = []
        summary = run_flow(summary_flow(plan), lambda requests: self.answer([(r, calls) for r in requests]))
        reused = sum(c["seconds"] for c in calls if c["cached"])
        return document_result(plan, calls, summary, time.perf_counter() - start + reused)

    def answer(self, requests: list[tuple[Request, list[dict[str, Any]]]]) -> list[Any]:
        """Answer a round of independent requests, each recording its calls in its own list: stored
        calls from the store, the rest together as parallel sequences of the engine (one at a time
        when it holds one), each stored as soon as its round is done."""
        answers: list[Any] = [None] * len(requests)
        todo: list[tuple[int, Call, str]] = []
        for i, (request, calls) in enumerate(requests):
            if isinstance(request, Group):
                answers[i] = self.execute(request)
                continue
            key = call_key(self.fp, request.role, request.body)
            hit = self.store.get_call(key)
            if hit is None:
                todo.append((i, request, key))
                continue
            calls.append({**hit, "cached": True})
            self._advance(hit, request.doc_tokens, cached=True)
            answers[i] = hit["summary"]
        for (i, call, key), info in zip(todo, self.run_calls([c for _, c, _ in todo])):
            if isinstance(info, BaseException):
                answers[i] = info
                continue
            self.store.put_call(key, info)
            requests[i][1].append({**info, "cached": False})
            self.stats.add(info)
            self._advance(info, call.doc_tokens, cached=False)
            answers[i] = info["summary"]
        return answers

    def run_calls(self, calls: list[Call]) -> list[dict[str, Any] | BaseException]:
        """Model calls, as parallel sequences when the engine has more than one; a call that fails
        gives its error in its place (the others' answers are kept)."""
        if len(calls) <= 1 or getattr(self.engine, "n_seq", 1) == 1:
            out: list[dict[str, Any] | BaseException] = []
            for call in calls:
                try:
                    out.append(self.run_call(call))
                except LocalctxError as exc:
                    out.append(exc)
            return out
        prepared: list[tuple[Call, dict[str, Any]] | BaseException] = []
        for call in calls:
            try:
                prepared.append((call, self._request(call)))
            except LocalctxError as exc:
                prepared.append(exc)
        ready = [p for p in prepared if not isinstance(p, BaseException)]
        start = time.perf_counter()
        gens = iter(self.engine.generate_many([r for _, r in ready], keep_errors=True))
        seconds = (time.perf_counter() - start) / max(1, len(ready))  # the round's time, shared
        return [p if isinstance(p, BaseException) else self._info(p[0], p[1], next(gens), seconds)
                for p in prepared]

    def execute(self, request: Request) -> Any:
        """Answer one request on this engine: a model call's record (not stored), or the groups."""
        if isinstance(request, Group):
            return self._group(list(request.parts))
        return self.run_call(request)

    def _check_stuff(self, tokens: int) -> None:
        try:
            self.engine.check_fits(tokens + self.map_frame.overhead, self.options.max_summary_tokens)
        except ContextOverflowError as exc:
            raise ContextOverflowError(f"--strategy stuff: the document is {tokens:,} tokens. {exc} "
                                       "Or use --strategy auto (map-reduce).") from None

    def _group(self, parts: list[str]) -> list[list[str]]:
        return group_parts(parts, self.engine.count, self.reduce_room)

    def run_call(self, call: Call) -> dict[str, Any]:
        """Run one model call. The frame's head (the instruction) is evaluated alone from the first
        token and the rest after it, so the answer does not depend on which call this engine ran
        before (llama.cpp's logits depend on the batch split): one process and any worker of a
        cluster give the same summary. A `whole` call's body is the whole document, read in one
        pass, whose KV state is worth a snapshot (its instruction and text come before the tail)."""
        request = self._request(call)
        start = time.perf_counter()
        gen = self.engine.complete(**request)
        return self._info(call, request, gen, time.perf_counter() - start)

    def _request(self, call: Call) -> dict[str, Any]:
        """The engine's arguments for a call (see `run_call`)."""
        frame = self.map_frame if call.role == "map" else self.reduce_frame
        if call.whole:
            self._check_stuff(call.doc_tokens)
        tokens = frame.tokens(self.engine, call.body)
        return dict(tokens=tokens, max_tokens=self.options.max_summary_tokens, temperature=self.options.temperature,
                    seed=self.options.seed, stop=frame.stop, repeat_penalty=self.options.repeat_penalty,
                    document_end=len(tokens) - len(frame.tail) if call.whole else None, head_end=len(frame.head))

    def _info(self, call: Call, request: dict[str, Any], gen: Any, seconds: float) -> dict[str, Any] | BaseException:
        if isinstance(gen, BaseException):
            return gen
        return {"role": call.role, "prompt_tokens": len(request["tokens"]),
                "generated_tokens": gen.timings.generated_tokens, "seconds": round(seconds, 3),
                "window": self.engine.n_ctx,  # the one this call ran at
                "restored_tokens": gen.timings.restored_tokens, "summary": gen.text.strip()}

    def _advance(self, info: dict[str, Any], doc_tokens: int, cached: bool) -> None:
        self._doc_tokens_done += doc_tokens
        self.reporter.call_done({**info, "cached": cached}, self._doc_tokens_done)


# --- The batch ---------------------------------------------------------------------------------


def store_dir() -> Path:
    return cache_dir() / "summarize"


def summarize_batch(inputs: Sequence[str], spec: RunSpec | Resolved, options: SummarizeOptions, *,
                    out: Path | None = None, stdin: IO[bytes] | None = None, reporter: Reporter | None = None,
                    on_record: Callable[[dict[str, Any]], None] | None = None, engine: Any = None,
                    store: Store | None = None, executor: Executor | None = None) -> BatchResult:
    """Summarize every input; finished work comes from the store, the rest runs on `engine` when
    given, else where `executor` runs it (this process by default, or Ray workers) while this
    process alone writes the store and the output. Records come back in input order; `on_record`
    sees each as soon as it is final. With `out`, Markdown files and summaries.jsonl are kept up to date."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    if engine is not None and executor is not None:
        raise InputError("An open engine runs in this process: pass either engine or workers (an executor), not both.")
    if out is not None:
        check_output_dir(out, "--out")
    sources = expand_inputs(inputs, exclude=out)
    targets = output_paths(out, sources) if out is not None else {}
    docs, skipped = read_documents(sources, stdin, reporter.warn)
    if not docs:
        raise InputError(f"No readable files among {', '.join(inputs)}: " + "; ".join(r["error"] for r in skipped))
    if engine is not None:
        facts, params, ladder = engine.facts, engine.params, engine.ladder
    else:  # resolved once: the engine is opened with the same Resolved
        resolved = spec if isinstance(spec, Resolved) else resolve_spec(spec)
        facts, params, ladder = resolved.facts, resolved.params, resolved.ladder
    fp = fingerprint(facts, ladder, options)
    store = store or Store(writable_cache(store_dir(), "summarizer's store"))
    batch = _Batch(docs, skipped, [s.label for s in sources], options, fp, store, reporter, on_record, out,
                   targets, {"model": facts.path.name, "preset": params.preset})
    if engine is not None:
        batch.run_on(lambda pending: batch.run_here(engine, pending, close=False))
    else:
        batch.run_on(lambda pending: (executor or LocalExecutor()).summarize(batch, pending, resolved))
    batch.stats.seconds = time.perf_counter() - started
    reporter.batch_done(batch.stats)
    return BatchResult(batch.ordered_records(), batch.stats, batch.out_files)


@dataclass
class _Active:
    """A document whose flow is in progress beside others (`_Batch._run_together`)."""

    doc: Document
    plan: Plan
    flow: Flow
    requests: list[Request]
    key: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False


class _Batch:
    def __init__(self, docs: list[Document], skipped: list[dict[str, Any]], order: list[str],
                 options: SummarizeOptions, fp: str,
                 store: Store, reporter: Reporter, on_record: Callable[[dict[str, Any]], None] | None,
                 out: Path | None, targets: dict[str, Path], meta: dict[str, str]) -> None:
        self.docs, self.options, self.fp, self.store = docs, options, fp, store
        self.reporter, self.on_record, self.out, self.meta = reporter, on_record, out, meta
        self.targets = targets  # label → output file, proven inside `out` (output_paths)
        self.records: dict[str, dict[str, Any]] = {r["path"]: r for r in skipped}
        self.order = order
        self.stats = BatchStats(documents=len(docs) + len(skipped), skipped=len(skipped))
        self.out_files: list[Path] = []

    def _key(self, doc: Document) -> str:
        return document_key(self.fp, self.options, doc.sha256)

    def _finished(self, doc: Document) -> dict[str, Any] | None:
        record = self.store.get_document(self._key(doc))
        if record is None or (record["status"] == "failed" and self.options.retry_failed):
            return None
        return record

    def run_on(self, run_pending: Callable[[list[Document]], None]) -> None:
        """Emit what is finished, then hand the rest to `run_pending` (nothing: no model, no workers)."""
        for record in self.records.values():  # the skipped ones
            if self.on_record:
                self.on_record(record)
        pending = []
        for doc in self.docs:
            record = self._finished(doc)
            if record is None:
                pending.append(doc)
            else:
                self._emit(doc, record, cached=True)
        self._write_jsonl()
        if not pending:
            return  # everything is done: the model is not even loaded
        self.stats.model_loaded = True
        run_pending(pending)

    def run_here(self, engine: Any, pending: list[Document], close: bool) -> None:
        try:
            self._run_pending(engine, pending)
        finally:
            if close:
                engine.close()

    def _run_pending(self, engine: Any, pending: list[Document]) -> None:
        summarizer = Summarizer(engine, self.store, self.options, self.fp, self.reporter)
        plans = [self._plan(summarizer, doc) for doc in pending]
        self.reporter.batch_start(len(self.order), len(self.records),
                                  sum(p.tokens for p in plans if p), sum(len(p.chunks) for p in plans if p))
        try:
            if getattr(engine, "n_seq", 1) > 1:
                self._run_together(summarizer, pending, plans)
                return
            for i, (doc, plan) in enumerate(zip(pending, plans), 1):
                if not self._done_already(doc):
                    self._run_one(summarizer, doc, plan, i, len(pending))
        finally:
            self.stats.merge(summarizer.stats)

    def _done_already(self, doc: Document) -> bool:
        record = self._finished(doc)  # a duplicate earlier in this batch may have done it
        if record is not None:
            self._emit(doc, record, cached=True)
            self._write_jsonl()
        return record is not None

    def _run_together(self, summarizer: Summarizer, pending: list[Document], plans: list[Plan | None]) -> None:
        """Several documents at once: every round of every active document's flow (its map
        chunks, or its one pass) is answered together, as parallel sequences of the engine, and a
        finished document makes room for the next. Each call's answer is what it would be alone."""
        queue = list(enumerate(zip(pending, plans), 1))
        active: list[_Active] = []
        while queue or active:
            while queue and len(active) < summarizer.engine.n_seq:
                i, (doc, plan) = queue[0]
                if any(a.key == self._key(doc) for a in active):
                    break  # the same content in flight: its duplicate waits for its record
                queue.pop(0)
                if not self._done_already(doc):
                    started = self._start_flow(summarizer, doc, plan, i, len(pending))
                    if started is not None:
                        active.append(started)
            if not active:
                continue
            rounds = [(a, r) for a in active for r in a.requests]
            answers = summarizer.answer([(r, a.calls) for a, r in rounds])
            for a in active:
                mine = [ans for (owner, _), ans in zip(rounds, answers) if owner is a]
                self._advance_flow(a, mine)
            active = [a for a in active if not a.finished]

    def _start_flow(self, summarizer: Summarizer, doc: Document, plan: Plan | None, i: int, n: int) -> _Active | None:
        try:
            plan = plan or summarizer.plan(doc)
            summarizer.reporter.doc_start(i, n, doc.label, plan.strategy, plan.tokens, len(plan.chunks))
            flow = summary_flow(plan)
            return _Active(doc, plan, flow, next(flow), self._key(doc))
        except Exception as exc:  # one bad document must not stop the batch; the reason is recorded
            self._fail(doc, plan, exc)
            return None

    def _advance_flow(self, a: _Active, answers: list[Any]) -> None:
        try:
            a.requests = a.flow.send(_raise_failed(answers))
        except StopIteration as stop:
            reused = sum(c["seconds"] for c in a.calls if c["cached"])
            seconds = time.perf_counter() - a.started + reused
            a.finished = True
            try:
                self.finish(a.doc, document_result(a.plan, a.calls, stop.value, seconds))
            except Exception as exc:
                self._fail(a.doc, a.plan, exc)
        except Exception as exc:
            a.finished = True
            self._fail(a.doc, a.plan, exc)

    def _fail(self, doc: Document, plan: Plan | None, exc: BaseException) -> None:
        message = error_message(exc)
        self.reporter.warn(f"{doc.label}: failed: {message}")
        self.finish(doc, failed_result(plan, message))

    def _plan(self, summarizer: Summarizer, doc: Document) -> Plan | None:
        try:
            return summarizer.plan(doc)
        except LocalctxError:
            return None  # reported when the document's turn comes

    def _run_one(self, summarizer: Summarizer, doc: Document, plan: Plan | None, i: int, n: int) -> None:
        try:
            plan = plan or summarizer.plan(doc)
            result = summarizer.summarize(doc, plan, i, n)
        except Exception as exc:  # one bad document must not stop the batch; the reason is recorded
            self._fail(doc, plan, exc)
            return
        self.finish(doc, result)

    def finish(self, doc: Document, result: dict[str, Any]) -> None:
        """Store a document's final record and emit it (the one writer: one process or a cluster's driver)."""
        record = {"path": doc.label, "sha256": doc.sha256, **self.meta, **result}
        self.store.put_document(self._key(doc), record)
        self._emit(doc, record, cached=False)
        self._write_jsonl()

    def emit_stored(self, doc: Document) -> None:
        """A document whose record another path of the same content just stored."""
        record = self.store.get_document(self._key(doc))
        if record is not None:
            self._emit(doc, record, cached=True)
            self._write_jsonl()

    def _emit(self, doc: Document, stored: dict[str, Any], cached: bool) -> None:
        record = {**stored, "path": doc.label}  # the same content may sit at another path
        if record["status"] == "failed":
            self.stats.failed += 1
        elif cached:
            self.stats.cached += 1
        else:
            self.stats.summarized += 1
        self.records[doc.label] = record
        if self.out is not None and record["status"] == "ok":
            target = self.targets[doc.label]
            resolved_inside(self.out, target)  # again: a link swapped into OUT since the start must not lead out
            self._write(target, lambda: atomic_write(target, markdown(record)))
            self.out_files.append(target)
        self.reporter.doc_done(record, cached)
        if self.on_record:
            self.on_record(record)

    def _write_jsonl(self) -> None:
        if self.out is not None:
            self._write(self.out / JSONL_NAME, lambda: write_jsonl(self.out, self.ordered_records()))

    @staticmethod
    def _write(target: Path, write: Callable[[], Any]) -> None:
        try:
            write()
        except OSError as exc:  # full disk, a directory in the way, permissions changed mid-batch
            raise LocalctxError(f"Cannot write {target}: {exc.strerror or exc}. Finished documents are saved "
                                "in the cache; fix the output and run the same command again.") from None

    def ordered_records(self) -> list[dict[str, Any]]:
        return [self.records[p] for p in dict.fromkeys(self.order) if p in self.records]
