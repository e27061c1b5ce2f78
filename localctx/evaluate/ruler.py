"""RULER-style evaluation: every task of `tasks` at each length, depth and sample, per preset,
cached like the other evaluations; and the summary of a grid (evaluate.summary)."""
from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..executor import Executor
from ..params import result_params
from ..runtime import Resolved, RunSpec
from .cache import CACHE_VERSION, CellCache
from .grid import (Cell, EngineFactory, EvalEngine, EvalResult, Key, Progress, open_eval_engine, run_grid,
                   same_step_groups)
from .haystack import RANDOM_DEPTHS, sentences
from .parse import Text
from .ppl import bos_prefix
from .tasks import TASKS, Build, Frame, Sample, sample_rng, vocabulary

FORMATS = ("auto", "chat", "raw")
# Bump when a task's prompt or scoring changes in a way its fingerprint does not show (the haystack
# builder, the frame): cached cells of the old prompts are then misses.
GENERATOR_VERSION = 2
_SENTINEL = "\x00localctx-message\x00"


@dataclass(frozen=True)
class RulerRequest:
    presets: Sequence[str]
    lengths: Sequence[int]  # each sample's prompt + its task's generated tokens, as RULER counts length
    text: Text  # the haystack: its sentences, and its words for common-word extraction
    tasks: Sequence[str] = tuple(TASKS)
    samples: int = 5  # per task, length and depth
    depths: Sequence[float] | None = None  # None: one of RULER's 40 depths at random per sample
    seed: int = 0
    prompt_format: str = "auto"  # auto: the chat template when the model has one, else raw text
    parallel: int = 1  # samples of one window at once, as parallel sequences (the same answers)
    threshold: float = 0.85  # effective length: the share of native's short-length score kept (evaluate.summary)

    def __post_init__(self) -> None:
        if self.prompt_format not in FORMATS:
            raise InputError(f"Unknown prompt format {self.prompt_format!r}; choose from {', '.join(FORMATS)}.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise InputError(f"Unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}.")


def chat_frame(engine: EvalEngine) -> Frame:
    """The model's template around one user message: its text before and after the message,
    tokenized with control tokens (the template writes any BOS itself)."""
    text = engine.format_chat([{"role": "user", "content": _SENTINEL}]).text
    before, found, after = text.partition(_SENTINEL)
    if not found:
        raise InputError("The model's chat template does not show the user's message; use --format raw.")
    return Frame(engine.tokenize(before, add_bos=False, special=True),
                 engine.tokenize(after, add_bos=False, special=True), chat=True)


def frame_for(engine: EvalEngine, chat: bool) -> Frame:
    return chat_frame(engine) if chat else Frame(bos_prefix(engine))


def cell_depth(seed: int, task: str, length: int, sample: int) -> float:
    """A random depth, as RULER draws one per sample; the same for every preset."""
    return random.Random(f"{seed}:{task}:{length}:depth:{sample}").choice(RANDOM_DEPTHS)


class Ruler:
    """The RULER-style evaluation as the grid loop drives it."""

    kind = "ruler"

    def __init__(self, request: RulerRequest) -> None:
        self.request = request
        self.parallel = request.parallel
        self.settings = {"presets": list(request.presets), "lengths": list(request.lengths),
                         "tasks": list(request.tasks), "samples": request.samples,
                         "depths": None if request.depths is None else list(request.depths), "seed": request.seed,
                         "format": request.prompt_format, "text": str(request.text.path),
                         "threshold": request.threshold}

    def chat(self, resolved: Resolved) -> bool:
        fmt = self.request.prompt_format
        return fmt == "chat" or (fmt == "auto" and bool(resolved.facts.chat_template))

    def _depths(self, task: str, length: int) -> list[tuple[float | None, int]]:
        r = self.request
        if not TASKS[task].uses_depth:
            return [(None, s) for s in range(r.samples)]
        if r.depths is None:
            return [(cell_depth(r.seed, task, length, s), s) for s in range(r.samples)]
        return [(d, s) for d in r.depths for s in range(r.samples)]

    def cells(self, resolved: Resolved, model: str) -> list[tuple[Cell, Key]]:
        r, fmt = self.request, "chat" if self.chat(resolved) else "raw"
        out = []
        for n in r.lengths:
            params = result_params(resolved.params_for(n))
            for task in r.tasks:
                for depth, s in self._depths(task, n):
                    out.append(({"length": n, "task": task, "depth": depth, "sample": s},
                                {"v": CACHE_VERSION, "kind": "ruler", "model": model, "params": params, "length": n,
                                 "task": task, "task_sha": TASKS[task].fingerprint(), "generator": GENERATOR_VERSION, "depth": depth, "sample": s,
                                 "seed": r.seed, "text": r.text.sha, "format": fmt}))
        return out

    @functools.cached_property
    def _text(self) -> tuple[list[str], list[str]]:
        return sentences(self.request.text.text), vocabulary(self.request.text.text)

    def sample(self, engine: EvalEngine, frame: Frame, cell: Cell) -> Sample:
        sents, words = self._text
        rng = sample_rng(self.request.seed, cell["task"], cell["length"], cell["depth"], cell["sample"])
        build = Build(lambda text: engine.tokenize(text, add_bos=False), frame, cell["length"], cell["depth"], rng,
                      sents, words)
        return TASKS[cell["task"]].build(build)

    def compute(self, engine: EvalEngine, resolved: Resolved, todo: list[tuple[Cell, Key]],
                progress: Progress) -> Iterator[tuple[Cell, Key, dict[str, Any]]]:
        frame = frame_for(engine, self.chat(resolved))
        stop = list(engine.chat_stop) if frame.chat else []
        # By length first (order's first field): an adaptive engine switches its window once per length.
        jobs = sorted(((cell, key, self.sample(engine, frame, cell)) for cell, key in todo),
                      key=lambda job: self.order(job[0]))
        for group in same_step_groups(engine, jobs, getattr(engine, "n_seq", 1)):
            start = time.perf_counter()
            gens = engine.generate_many([dict(tokens=s.tokens, max_tokens=s.gen_tokens, temperature=0.0,
                                              head_end=s.head_end, stop=stop) for *_, s in group])
            seconds = round((time.perf_counter() - start) / len(group), 2)  # a group's time, shared
            for (cell, key, s), gen in zip(group, gens):
                yield cell, key, result(s, gen.text, seconds)

    def describe(self, cell: Cell, found: dict[str, Any]) -> str:
        return f"{found['score']:.2f} (answer {found['answer'].strip()[:48]!r})"

    def order(self, cell: Cell) -> tuple[Any, ...]:
        return (cell["length"], list(TASKS).index(cell["task"]), -1 if cell["depth"] is None else cell["depth"],
                cell["sample"])


def result(sample: Sample, answer: str, seconds: float) -> dict[str, Any]:
    return {"status": "ok", **TASKS[sample.task].score(answer, sample.answers), "answer": answer,
            "answers": sample.answers, "prompt_tokens": len(sample.tokens), "needle_tokens": sample.needle_tokens,
            "needle_depths": [round(d, 4) for d in sample.depths], "seconds": seconds}


def run_ruler(request: RulerRequest, spec: RunSpec | Resolved = RunSpec(), *, cache: CellCache | None = None,
              engine_factory: EngineFactory = open_eval_engine, progress: Progress = lambda _: None,
              compute: bool = True, executor: Executor | None = None) -> EvalResult:
    """Every (preset, length, task, depth, sample) cell, cached like `run_passkey`."""
    return run_grid(Ruler(request), request.presets, spec, cache=cache, engine_factory=engine_factory,
                    progress=progress, compute=compute, executor=executor)
