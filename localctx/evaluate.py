"""Long-context evaluation over the engine: perplexity against context length (fixed-span, and
llama-perplexity's chunked mode), passkey retrieval, a resumable per-cell cache, and rendering
(table, CSV, plots). No Click here: the `eval` commands are thin wrappers over `run_ppl` and
`run_passkey`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .documents import read_text
from .errors import InputError, LocalctxError
from .gguf_meta import ModelFacts
from .paths import cache_dir
from .presets import RuntimeParams
from .runtime import RunSpec, resolve_spec

DEFAULT_TEXT = "pride_and_prejudice.txt"
DEFAULT_SPAN = 256
DEFAULT_CHUNK_CTX = 512
# Passkey prompt from Mohtashami & Jaggi (2023), "Landmark Attention", as used by LongLoRA/YaRN.
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens decoded after the question; part of each cell's length
# Bump when the meaning of a cached cell changes (scoring, prompt wording).
CACHE_VERSION = 1

Progress = Callable[[str], None]


class EvalEngine(Protocol):
    """What evaluation needs from an engine (the real Engine, or a test's counting wrapper)."""

    n_ctx: int
    params: RuntimeParams

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...
    def logits_at(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray: ...
    def complete(self, tokens: Sequence[int], **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


EngineFactory = Callable[[RunSpec], EvalEngine]


def open_eval_engine(spec: RunSpec) -> EvalEngine:
    from .runtime import open_engine  # imports llama_cpp: only when a cell needs the model

    return open_engine(spec)


# --- Parsing -----------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """'2k,4k,8192' → [2048, 4096, 8192] (k = 1024, as context sizes are counted)."""
    lengths = []
    for item in _items(text):
        m = re.fullmatch(r"(\d+)([kK]?)", item)
        if not m or int(m.group(1)) == 0:
            raise InputError(f"Bad length {item!r}: use token counts such as 2048 or 2k (k = 1024).")
        lengths.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return sorted(set(lengths))


def parse_depths(text: str) -> list[float]:
    depths = []
    for item in _items(text):
        try:
            depth = float(item)
        except ValueError:
            depth = -1.0
        if not 0.0 <= depth <= 1.0:
            raise InputError(f"Bad depth {item!r}: depths are fractions from 0 (start) to 1 (end).")
        depths.append(depth)
    return sorted(set(depths))


def parse_presets(text: str) -> list[str]:
    return list(dict.fromkeys(_items(text)))


def _items(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError("Give at least one value (comma-separated).")
    return items


# --- Inputs and cache keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    path: Path
    text: str
    sha: str


def default_text_path() -> Path:
    """The shared corpus beside the repository (`<repo>/../shared/corpus`), when run from a checkout."""
    repo = Path(__file__).resolve().parent.parent
    path = repo.parent / "shared" / "corpus" / DEFAULT_TEXT
    if not path.is_file():
        raise InputError(
            f"No default evaluation text: {path} does not exist (it is only there in a checkout "
            "beside ../shared/corpus). Pass --text FILE with a long plain-text file."
        )
    return path


def load_text(path: str | os.PathLike[str] | None) -> Text:
    path = Path(path) if path is not None else default_text_path()
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path} is empty.")
    return Text(path, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])


def model_key(facts: ModelFacts) -> str:
    """Identifies the model file by content (size and first 4 MiB: header and metadata), so a moved
    file keeps its cache and a re-converted one does not."""
    h = hashlib.sha256(str(facts.file_size).encode())
    with open(facts.path, "rb") as f:
        h.update(f.read(4 * 2**20))
    return h.hexdigest()[:16]


def _params_key(params: RuntimeParams) -> dict[str, Any]:
    data = params.to_dict()
    data.pop("notes", None)
    return data


class CellCache:
    """Finished cells, one JSON file each, under the user cache dir: a crash loses at most the cell
    being computed, and concurrent runs never corrupt each other's results."""

    def __init__(self, directory: Path | None = None, enabled: bool = True) -> None:
        self.directory = directory or cache_dir() / "eval"
        self.enabled = enabled

    def _file(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        try:
            data = json.loads(self._file(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data.get("result") if data.get("key") == key else None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._file(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}), encoding="utf-8")
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one


# --- Results -----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    kind: str  # "ppl" | "passkey"
    model: str
    settings: dict[str, Any]
    cells: list[dict[str, Any]] = field(default_factory=list)
    computed: int = 0  # cells computed in this run (the rest came from the cache or were n/a)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "settings": self.settings, "cells": self.cells}


# --- Perplexity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PplRequest:
    presets: Sequence[str]
    lengths: Sequence[int]
    text: Text
    mode: str = "fixed"  # fixed | chunks
    span: int = DEFAULT_SPAN  # fixed: tokens scored
    end: int | None = None  # fixed: text token where the span ends [default: the largest length]
    max_chunks: int | None = None  # chunks: stop after this many windows (like --chunks)


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits (stable log-softmax)."""
    x = logits.astype(np.float64)
    peak = x.max(axis=1)
    lse = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), np.asarray(targets)]


def bos_prefix(engine: EvalEngine) -> list[int]:
    """BOS when the model's tokenizer adds one (llama-perplexity's rule), else nothing."""
    return engine.tokenize("", add_bos=True)


def fixed_window(tokens: Sequence[int], prefix: Sequence[int], length: int, end: int, span: int) -> list[int]:
    """The `length` tokens ending at text token `end`: prefix + the text before `end`. The last
    `span` of them are scored. Never shorter than asked: raises instead."""
    body = length - len(prefix)
    if span >= body:
        raise InputError(f"Length {length:,} leaves no context before the {span}-token scored span; "
                         f"use lengths above {span + len(prefix) + 1} or a smaller --span.")
    if end > len(tokens):
        raise InputError(f"The text has {len(tokens):,} tokens, but the scored span must end at token {end:,}. "
                         "Pass a longer --text, smaller --lengths or a smaller --end.")
    if end - body < 0:
        raise InputError(f"Length {length:,} needs {body:,} text tokens before token {end:,}: "
                         f"raise --end to at least {body:,}.")
    return list(prefix) + list(tokens[end - body : end])


def score_window(engine: EvalEngine, window: Sequence[int], first: int) -> tuple[float, int]:
    """Sum of NLL of window[first+1:] given what precedes each; logits only at those positions."""
    positions = list(range(first, len(window) - 1))
    logits = engine.logits_at(window, positions)
    nll = token_nll(logits, [window[p + 1] for p in positions])
    return float(nll.sum()), len(positions)


def fixed_span_cell(engine: EvalEngine, tokens: Sequence[int], length: int, end: int, span: int) -> dict[str, Any]:
    window = fixed_window(tokens, bos_prefix(engine), length, end, span)
    start = time.perf_counter()
    total, n = score_window(engine, window, len(window) - span - 1)
    seconds = time.perf_counter() - start
    return _ppl_fields(total, n, seconds, len(window))


def chunks_cell(engine: EvalEngine, tokens: Sequence[int], n_ctx: int, max_chunks: int | None,
                progress: Progress) -> dict[str, Any]:
    """What llama-perplexity computes: consecutive n_ctx windows, BOS first (when the model uses
    one), the second half of each window scored."""
    prefix = bos_prefix(engine)
    stream = list(prefix) + list(tokens)
    n_chunks = len(stream) // n_ctx
    if n_chunks == 0:
        raise InputError(f"The text has {len(stream):,} tokens, fewer than one {n_ctx:,}-token window.")
    n_chunks = min(n_chunks, max_chunks or n_chunks)
    total, n, start = 0.0, 0, time.perf_counter()
    for i in range(n_chunks):
        window = stream[i * n_ctx : (i + 1) * n_ctx]
        if prefix:
            window[0] = prefix[0]
        s, k = score_window(engine, window, n_ctx // 2)
        total, n = total + s, n + k
        if (i + 1) % 10 == 0 or i + 1 == n_chunks:
            progress(f"    chunk {i + 1}/{n_chunks}: ppl {math.exp(total / n):.4f}")
    cell = _ppl_fields(total, n, time.perf_counter() - start, n_chunks * n_ctx)
    cell["chunks"] = n_chunks
    return cell


def _ppl_fields(total: float, n: int, seconds: float, evaluated: int) -> dict[str, Any]:
    return {"status": "ok", "ppl": math.exp(total / n), "nll": total / n, "scored_tokens": n,
            "evaluated_tokens": evaluated, "seconds": round(seconds, 2),
            "tokens_per_second": round(evaluated / seconds, 1) if seconds else None}


def run_ppl(request: PplRequest, spec: RunSpec = RunSpec(), *, cache: CellCache | None = None,
            engine_factory: EngineFactory = open_eval_engine, progress: Progress = lambda _: None,
            compute: bool = True) -> EvalResult:
    """Perplexity for every (preset, length) cell; cached cells are not recomputed, and a preset's
    model is loaded only when one of its cells needs computing. With `compute=False` missing cells
    are reported as "not run" (a report of what a long run has finished so far)."""
    if request.mode not in ("fixed", "chunks"):
        raise InputError(f"Unknown mode {request.mode!r}: use fixed or chunks.")
    cache = cache or CellCache()
    end = request.end if request.end is not None else max(request.lengths)
    settings = {"mode": request.mode, "text": str(request.text.path), "text_sha256": request.text.sha,
                "presets": list(request.presets), "lengths": list(request.lengths)}
    if request.mode == "fixed":
        settings.update(span=request.span, end=end)
    else:
        settings.update(max_chunks=request.max_chunks)
    result: EvalResult | None = None
    tokens: list[int] | None = None  # the text's tokens, from the first engine loaded
    total = len(request.presets) * len(request.lengths)
    done = 0
    for name in request.presets:
        facts, params = resolve_spec(replace(spec, preset=name))
        if result is None:
            result = EvalResult("ppl", str(facts.path), settings)
            mkey = model_key(facts)
        engine: EvalEngine | None = None
        try:
            for length in request.lengths:
                done += 1
                label = f"[{done}/{total}] {name} {length:,}"
                cell = {"preset": name, "method": params.method, "window": params.n_ctx, "length": length}
                if length > params.n_ctx:
                    cell.update(status="n/a", reason=f"length {length:,} exceeds the preset's {params.n_ctx:,}-token window")
                    progress(f"{label}: n/a (window {params.n_ctx:,})")
                    result.cells.append(cell)
                    continue
                key = {"v": CACHE_VERSION, "kind": "ppl", "mode": request.mode, "model": mkey,
                       "params": _params_key(params), "length": length, "text": request.text.sha,
                       **({"span": request.span, "end": end} if request.mode == "fixed" else
                          {"max_chunks": request.max_chunks})}
                found = cache.get(key)
                if found is None and not compute:
                    result.cells.append({**cell, "status": "not run"})
                    continue
                if found is None:
                    if engine is None:
                        progress(f"loading {facts.name} with preset {name} (window {params.n_ctx:,})")
                        engine = engine_factory(replace(spec, preset=name))
                        if tokens is None:
                            tokens = engine.tokenize(request.text.text, add_bos=False)
                    progress(f"{label}: computing ...")
                    if request.mode == "fixed":
                        found = fixed_span_cell(engine, tokens, length, end, request.span)
                    else:
                        found = chunks_cell(engine, tokens, length, request.max_chunks, progress)
                        found["llama_perplexity"] = llama_perplexity_command(facts, params, request.text.path, length,
                                                                             request.max_chunks)
                    cache.put(key, found)
                    result.computed += 1
                    progress(f"{label}: ppl {found['ppl']:.4f} ({found['seconds']:.0f} s)")
                else:
                    progress(f"{label}: ppl {found['ppl']:.4f} (cached)")
                result.cells.append({**cell, **found, "params": params.to_dict()})
        finally:
            if engine is not None:
                engine.close()
    assert result is not None
    return result


def llama_perplexity_command(facts: ModelFacts, params: RuntimeParams, text: Path, n_ctx: int,
                             max_chunks: int | None) -> str:
    """The llama.cpp command that computes the same number (for cross-checking)."""
    flags = params.llama_flags()
    flags[flags.index("-c") + 1] = str(n_ctx)
    chunks = ["--chunks", str(max_chunks)] if max_chunks else []
    return " ".join(["llama-perplexity", "-m", str(facts.path), "-f", str(text), *flags, *chunks])


# --- Passkey -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyPrompt:
    tokens: list[int]
    key: int
    key_start: int  # index of the first token of the key sentence
    filler_start: int  # index of the first filler token (right after the task line)
    filler_tokens: int  # filler tokens in all, before and after the key

    @property
    def depth(self) -> float:
        """Where the key sits within the filler: 0 right after the task line, 1 right before the question."""
        return (self.key_start - self.filler_start) / self.filler_tokens if self.filler_tokens else 0.0


def build_passkey_prompt(tokenize: Callable[[str], list[int]], prefix: Sequence[int], n_tokens: int,
                         depth: float, key: int) -> PasskeyPrompt:
    """A prompt of exactly `n_tokens` tokens with the key sentence at `depth` of the filler.

    Pieces are tokenized separately and joined as token lists, so the length is exact; the filler
    is cut at a token boundary to make it so."""
    task = tokenize(TASK)
    unit = tokenize(" " + FILLER)
    key_line = tokenize(" " + KEY_LINE.format(key=key))
    question = tokenize(" " + QUESTION)
    fixed = len(prefix) + len(task) + len(key_line) + len(question)
    budget = n_tokens - fixed
    if budget < 0:
        raise InputError(f"A passkey prompt needs at least {fixed} tokens; {n_tokens} is too short.")
    before = round(depth * budget)
    # The filler before and after the key both start at the start of the same repeated stream, so
    # prompts of one trial share long prefixes and the KV cache is reused between them.
    stream = unit * (budget // len(unit) + 1)
    head = list(prefix) + task
    tokens = head + stream[:before] + key_line + stream[: budget - before] + question
    return PasskeyPrompt(tokens, key, len(head) + before, len(head), budget)


def passkey_key(seed: int, trial: int) -> int:
    """The key of one trial: the same at every length and depth, so cells differ only in those."""
    return random.Random(f"{seed}:{trial}").randint(10000, 99999)


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@dataclass(frozen=True)
class PasskeyRequest:
    presets: Sequence[str]
    lengths: Sequence[int]  # each cell uses exactly this many positions: prompt + ANSWER_TOKENS
    depths: Sequence[float]
    trials: int = 1
    seed: int = 0


def passkey_cell(engine: EvalEngine, prompt: PasskeyPrompt) -> dict[str, Any]:
    start = time.perf_counter()
    gen = engine.complete(prompt.tokens, max_tokens=ANSWER_TOKENS, temperature=0.0)
    found = first_integer(gen.text)
    return {"status": "ok", "key": prompt.key, "answer": gen.text, "found": found,
            "correct": found == prompt.key, "prompt_tokens": len(prompt.tokens),
            "key_token": prompt.key_start, "seconds": round(time.perf_counter() - start, 2)}


def run_passkey(request: PasskeyRequest, spec: RunSpec = RunSpec(), *, cache: CellCache | None = None,
                engine_factory: EngineFactory = open_eval_engine, progress: Progress = lambda _: None,
                compute: bool = True) -> EvalResult:
    """Passkey retrieval for every (preset, length, depth, trial) cell, cached like `run_ppl`."""
    cache = cache or CellCache()
    prompt_sha = hashlib.sha256("\n".join([TASK, FILLER, KEY_LINE, QUESTION]).encode()).hexdigest()[:12]
    settings = {"presets": list(request.presets), "lengths": list(request.lengths), "depths": list(request.depths),
                "trials": request.trials, "seed": request.seed, "answer_tokens": ANSWER_TOKENS}
    result: EvalResult | None = None
    grid = [(n, d, t) for n in request.lengths for d in request.depths for t in range(request.trials)]
    total, done = len(request.presets) * len(grid), 0
    for name in request.presets:
        facts, params = resolve_spec(replace(spec, preset=name))
        if result is None:
            result = EvalResult("passkey", str(facts.path), settings)
            mkey = model_key(facts)
        todo: list[tuple[dict[str, Any], dict[str, Any], tuple[int, float, int]]] = []
        for length, depth, trial in grid:
            cell = {"preset": name, "method": params.method, "window": params.n_ctx, "length": length,
                    "depth": depth, "trial": trial}
            if length > params.n_ctx:
                cell.update(status="n/a", reason=f"length {length:,} exceeds the preset's {params.n_ctx:,}-token window")
                result.cells.append(cell)
                done += 1
                continue
            key = {"v": CACHE_VERSION, "kind": "passkey", "model": mkey, "params": _params_key(params),
                   "length": length, "depth": depth, "trial": trial, "seed": request.seed,
                   "answer_tokens": ANSWER_TOKENS, "prompt": prompt_sha}
            found = cache.get(key)
            if found is not None:
                done += 1
                progress(f"[{done}/{total}] {name} {length:,} depth {depth:g} trial {trial}: "
                         f"{'ok' if found['correct'] else 'wrong'} (cached)")
                result.cells.append({**cell, **found})
            elif not compute:
                done += 1
                result.cells.append({**cell, "status": "not run"})
            else:
                todo.append((cell, key, (length, depth, trial)))
        if todo:
            done = _passkey_preset(todo, result, spec, name, request, cache, engine_factory, progress, done, total)
    assert result is not None
    result.cells.sort(key=lambda c: (request.presets.index(c["preset"]), c["length"], c["depth"], c["trial"]))
    return result


def _passkey_preset(todo: list, result: EvalResult, spec: RunSpec, name: str, request: PasskeyRequest,
                    cache: CellCache, engine_factory: EngineFactory, progress: Progress, done: int, total: int) -> int:
    progress(f"loading the model with preset {name}")
    with _closing(engine_factory(replace(spec, preset=name))) as engine:
        prefix = bos_prefix(engine)
        tokenize = lambda s: engine.tokenize(s, add_bos=False)  # noqa: E731
        jobs = [(cell, key, build_passkey_prompt(tokenize, prefix, n - ANSWER_TOKENS, d, passkey_key(request.seed, t)))
                for cell, key, (n, d, t) in todo]
        # Lexicographic order walks the prompts' prefix tree depth-first: each prompt re-evaluates
        # only what it does not share with the one before (llama-cpp-python's prefix reuse).
        jobs.sort(key=lambda job: job[2].tokens)
        for cell, key, prompt in jobs:
            found = passkey_cell(engine, prompt)
            cache.put(key, found)
            result.computed += 1
            done += 1
            progress(f"[{done}/{total}] {name} {cell['length']:,} depth {cell['depth']:g} trial {cell['trial']}: "
                     f"{'ok' if found['correct'] else 'wrong'} (answer {found['answer'].strip()!r}, {found['seconds']:.0f} s)")
            result.cells.append({**cell, **found})
    return done


class _closing:
    def __init__(self, engine: EvalEngine) -> None:
        self.engine = engine

    def __enter__(self) -> EvalEngine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.close()


def passkey_accuracy(cells: Iterable[dict[str, Any]]) -> dict[tuple[str, int, float], float | None]:
    """Mean accuracy per (preset, length, depth) over trials; None for n/a cells."""
    groups: dict[tuple[str, int, float], list[bool]] = {}
    for c in cells:
        bucket = groups.setdefault((c["preset"], c["length"], c["depth"]), [])
        if c["status"] == "ok":
            bucket.append(bool(c["correct"]))
    return {k: (sum(v) / len(v) if v else None) for k, v in groups.items()}


# --- Rendering ---------------------------------------------------------------------------------


def _absent(cell: dict[str, Any]) -> str:
    return "-" if cell["status"] == "not run" else "n/a"


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ppl_table(result: EvalResult) -> str:
    lengths = result.settings["lengths"]
    values = {(c["preset"], c["length"]): c for c in result.cells}
    width = max([len(p) for p in result.settings["presets"]] + [6])
    lines = [f"{'preset':<{width}}" + "".join(f"{_length_label(n):>10}" for n in lengths)]
    for preset in result.settings["presets"]:
        row = f"{preset:<{width}}"
        for n in lengths:
            c = values[(preset, n)]
            row += f"{c['ppl']:>10.3f}" if c["status"] == "ok" else f"{_absent(c):>10}"
        lines.append(row)
    return "\n".join(lines)


def _not_run(cells: Iterable[dict[str, Any]]) -> set[tuple[str, int, float]]:
    return {(c["preset"], c["length"], c["depth"]) for c in cells if c["status"] == "not run"}


def passkey_table(result: EvalResult) -> str:
    depths = result.settings["depths"]
    acc, missing = passkey_accuracy(result.cells), _not_run(result.cells)
    width = max([len(p) for p in result.settings["presets"]] + [6])
    lines = [f"{'preset':<{width}}{'length':>8}" + "".join(f"{'d=' + format(d, 'g'):>8}" for d in depths) + f"{'mean':>8}"]
    for preset in result.settings["presets"]:
        for n in result.settings["lengths"]:
            scores = [acc.get((preset, n, d)) for d in depths]
            marks = ["-" if (preset, n, d) in missing else "n/a" for d in depths]
            cols = "".join(f"{m if s is None else format(s, '.2f'):>8}" for s, m in zip(scores, marks))
            known = [s for s in scores if s is not None]
            mean = f"{sum(known) / len(known):.2f}" if known else "n/a"
            lines.append(f"{preset:<{width}}{_length_label(n):>8}{cols}{mean:>8}")
    return "\n".join(lines)


CSV_FIELDS = {
    "ppl": ["preset", "method", "window", "length", "status", "ppl", "nll", "scored_tokens", "evaluated_tokens",
            "chunks", "seconds", "tokens_per_second", "reason"],
    "passkey": ["preset", "method", "window", "length", "depth", "trial", "status", "key", "found", "correct",
                "prompt_tokens", "key_token", "seconds", "answer", "reason"],
}


def to_csv(result: EvalResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS[result.kind], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in result.cells:
        writer.writerow(cell)
    return out.getvalue()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LocalctxError("--plot needs matplotlib: pip install 'localctx[plot]'") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    plt = _pyplot()
    fig = _plot_ppl(plt, result) if result.kind == "ppl" else _plot_passkey(plt, result)
    path = Path(path)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise LocalctxError(f"Cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def _plot_ppl(plt: Any, result: EvalResult) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in result.settings["presets"]:
        points = sorted((c["length"], c["ppl"]) for c in result.cells if c["preset"] == preset and c["status"] == "ok")
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=preset)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = result.settings["lengths"]
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    mode = result.settings["mode"]
    ax.set_title(f"{Path(result.model).name}: {'fixed ' + str(result.settings.get('span')) + '-token span' if mode == 'fixed' else 'chunked'} perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _plot_passkey(plt: Any, result: EvalResult) -> Any:
    presets, lengths, depths = result.settings["presets"], result.settings["lengths"], result.settings["depths"]
    acc, missing = passkey_accuracy(result.cells), _not_run(result.cells)
    fig, axes = plt.subplots(1, len(presets), figsize=(2.2 + 2.6 * len(presets), 0.8 + 0.5 * len(lengths) + 1.5),
                             squeeze=False)
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("lightgrey")
    for ax, preset in zip(axes[0], presets):
        grid = np.array([[np.nan if acc.get((preset, n, d)) is None else acc[(preset, n, d)] for d in depths]
                         for n in lengths], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_xlabel("key depth")
        ax.set_title(preset, fontsize=10)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                absent = "not run" if (preset, lengths[i], depths[j]) in missing else "n/a"
                ax.text(j, i, absent if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("context length")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    fig.suptitle(f"{Path(result.model).name}: passkey retrieval")
    return fig
