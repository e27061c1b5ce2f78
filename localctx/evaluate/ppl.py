"""Perplexity against context length: a fixed span scored after each length of context, or
llama-perplexity's consecutive windows (so the numbers can be checked against that tool)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..executor import Executor
from ..errors import InputError
from ..gguf_meta import ModelFacts
from ..params import RuntimeParams, result_params
from ..runtime import Resolved, RunSpec
from .cache import CACHE_VERSION, CellCache
from .grid import (Cell, EngineFactory, EvalEngine, EvalResult, Key, Progress, open_eval_engine, run_grid,
                   same_step_groups)
from .parse import Text

DEFAULT_SPAN = 256
MODES = ("fixed", "chunks")


@dataclass(frozen=True)
class PplRequest:
    presets: Sequence[str]
    lengths: Sequence[int]
    text: Text
    mode: str = "fixed"  # fixed | chunks
    span: int = DEFAULT_SPAN  # fixed: tokens scored
    end: int | None = None  # fixed: text token where the span ends [default: the largest length]
    max_chunks: int | None = None  # chunks: stop after this many windows (like --chunks)
    parallel: int = 1  # windows at once, as sequences sharing batches (each cell's result is the same)


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


def score_windows(engine: EvalEngine, windows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, int]]:
    """For each (window, first): the sum of NLL of window[first+1:] given what precedes each, and
    how many; logits only at those positions. An engine of several sequences scores the windows
    as parallel sequences (Engine.logits_many: the same logits as one at a time)."""
    requests = [(window, list(range(first, len(window) - 1))) for window, first in windows]
    if getattr(engine, "n_seq", 1) > 1:
        logits = engine.logits_many(requests)
    else:
        logits = [engine.logits_at(window, positions) for window, positions in requests]
    return [(float(token_nll(rows, [window[p + 1] for p in positions]).sum()), len(positions))
            for (window, positions), rows in zip(requests, logits)]


def fixed_span_cells(engine: EvalEngine, tokens: Sequence[int], lengths: Sequence[int], end: int,
                     span: int) -> list[dict[str, Any]]:
    """The cells of `lengths` (at one window), scored together; each reports the group's time shared."""
    prefix = bos_prefix(engine)
    windows = [fixed_window(tokens, prefix, length, end, span) for length in lengths]
    start = time.perf_counter()
    scores = score_windows(engine, [(window, len(window) - span - 1) for window in windows])
    seconds = (time.perf_counter() - start) / len(windows)
    return [_ppl_fields(total, n, seconds, len(window)) for window, (total, n) in zip(windows, scores)]


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
    step = getattr(engine, "n_seq", 1)  # windows scored at once
    for first in range(0, n_chunks, step):
        windows = []
        for i in range(first, min(first + step, n_chunks)):
            window = stream[i * n_ctx : (i + 1) * n_ctx]
            if prefix:
                window[0] = prefix[0]
            windows.append((window, n_ctx // 2))
        for s, k in score_windows(engine, windows):
            total, n = total + s, n + k
        done = first + len(windows)
        if done // 10 > first // 10 or done == n_chunks:
            progress(f"    chunk {done}/{n_chunks}: ppl {math.exp(total / n):.4f}")
    cell = _ppl_fields(total, n, time.perf_counter() - start, n_chunks * n_ctx)
    cell["chunks"] = n_chunks
    return cell


def _ppl_fields(total: float, n: int, seconds: float, evaluated: int) -> dict[str, Any]:
    return {"status": "ok", "ppl": math.exp(total / n), "nll": total / n, "scored_tokens": n,
            "evaluated_tokens": evaluated, "seconds": round(seconds, 2),
            "tokens_per_second": round(evaluated / seconds, 1) if seconds else None}


def llama_perplexity_command(facts: ModelFacts, params: RuntimeParams, text: Path, n_ctx: int,
                             max_chunks: int | None) -> str:
    """The llama.cpp command that computes the same number (for cross-checking)."""
    flags = params.llama_flags()
    flags[flags.index("-c") + 1] = str(n_ctx)
    chunks = ["--chunks", str(max_chunks)] if max_chunks else []
    return " ".join(["llama-perplexity", "-m", str(facts.path), "-f", str(text), *flags, *chunks])


class Perplexity:
    """The perplexity evaluation as the grid loop drives it."""

    kind = "ppl"

    def __init__(self, request: PplRequest) -> None:
        if request.mode not in MODES:
            raise InputError(f"Unknown mode {request.mode!r}: use {' or '.join(MODES)}.")
        self.request = request
        self.parallel = request.parallel  # cells a Ray worker takes at once (distributed.EvaluateJob)
        self.end = request.end if request.end is not None else max(request.lengths)
        self.settings = {"mode": request.mode, "text": str(request.text.path), "text_sha256": request.text.sha,
                         "presets": list(request.presets), "lengths": list(request.lengths)}
        if request.mode == "fixed":
            self.settings.update(span=request.span, end=self.end)
        else:
            self.settings.update(max_chunks=request.max_chunks)
        self.tokens: list[int] | None = None  # the text's tokens, from the first engine loaded

    def cells(self, resolved: Resolved, model: str) -> list[tuple[Cell, Key]]:
        r = self.request
        by_mode = {"span": r.span, "end": self.end} if r.mode == "fixed" else {"max_chunks": r.max_chunks}
        return [({"length": length},
                 {"v": CACHE_VERSION, "kind": "ppl", "mode": r.mode, "model": model,
                  "params": result_params(resolved.params_for(length)), "length": length, "text": r.text.sha,
                  **by_mode})
                for length in r.lengths]

    def compute(self, engine: EvalEngine, resolved: Resolved, todo: list[tuple[Cell, Key]],
                progress: Progress) -> Iterator[tuple[Cell, Key, dict[str, Any]]]:
        r = self.request
        if self.tokens is None:
            self.tokens = engine.tokenize(r.text.text, add_bos=False)
        if r.mode == "fixed":
            # By length: an adaptive engine switches window once per step, and cells of one step
            # are scored together when the engine has several sequences.
            jobs = sorted(todo, key=lambda job: job[0]["length"])
            for group in same_step_groups(engine, jobs, getattr(engine, "n_seq", 1)):
                lengths = [cell["length"] for cell, _ in group]
                progress(f"{group[0][0]['preset']} {', '.join(f'{n:,}' for n in lengths)}: computing ...")
                found = fixed_span_cells(engine, self.tokens, lengths, self.end, r.span)
                yield from ((cell, key, f) for (cell, key), f in zip(group, found))
            return
        for cell, key in todo:
            progress(f"{cell['preset']} {cell['length']:,}: computing ...")
            found = chunks_cell(engine, self.tokens, cell["length"], r.max_chunks, progress)
            found["llama_perplexity"] = llama_perplexity_command(resolved.facts, resolved.params_for(cell["length"]),
                                                                 r.text.path, cell["length"], r.max_chunks)
            yield cell, key, found

    def describe(self, cell: Cell, found: dict[str, Any]) -> str:
        return f"ppl {found['ppl']:.4f}"

    def order(self, cell: Cell) -> tuple[Any, ...]:
        return (cell["length"],)


def run_ppl(request: PplRequest, spec: RunSpec | Resolved = RunSpec(), *, cache: CellCache | None = None,
            engine_factory: EngineFactory = open_eval_engine, progress: Progress = lambda _: None,
            compute: bool = True, executor: Executor | None = None) -> EvalResult:
    """Perplexity for every (preset, length) cell (see `grid.run_grid` for caching and loading)."""
    return run_grid(Perplexity(request), request.presets, spec, cache=cache, engine_factory=engine_factory,
                    progress=progress, compute=compute, executor=executor)
