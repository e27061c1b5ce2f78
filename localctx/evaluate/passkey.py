"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", as used by LongLoRA and YaRN):
a number hidden at a depth of a filler text of an exact length, asked for at the end."""
from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..executor import Executor
from ..errors import InputError
from ..params import result_params
from ..runtime import Resolved, RunSpec
from .cache import CACHE_VERSION, CellCache
from .grid import (Cell, EngineFactory, EvalEngine, EvalResult, Key, Progress, open_eval_engine, run_grid,
                   same_step_groups)
from .ppl import bos_prefix

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens decoded after the question; part of each cell's length
PROMPT_SHA = hashlib.sha256("\n".join([TASK, FILLER, KEY_LINE, QUESTION]).encode()).hexdigest()[:12]


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
    parallel: int = 1  # cells at once, as sequences of one batch (a cell's answer does not depend on it)


def passkey_cell(engine: EvalEngine, prompt: PasskeyPrompt) -> dict[str, Any]:
    start = time.perf_counter()
    # The task line is evaluated alone and the rest after it, whatever this engine ran before: a
    # cell's answer is the same in any order, on any worker, and after a resume (llama.cpp's logits
    # depend on the batch split; see Engine.generate's head_end).
    gen = engine.complete(prompt.tokens, max_tokens=ANSWER_TOKENS, temperature=0.0, head_end=prompt.filler_start)
    return _result(prompt, gen.text, round(time.perf_counter() - start, 2))


def passkey_cells(engine: EvalEngine, prompts: Sequence[PasskeyPrompt]) -> list[dict[str, Any]]:
    """Several cells at once, as parallel sequences: each answer is the one `passkey_cell` gives
    (an exact engine: the same split, the same kernels; see localctx.engine.backend.Context)."""
    start = time.perf_counter()
    gens = engine.generate_many([dict(tokens=p.tokens, max_tokens=ANSWER_TOKENS, temperature=0.0,
                                      head_end=p.filler_start) for p in prompts])
    seconds = round((time.perf_counter() - start) / len(prompts), 2)  # the group's time, shared
    return [_result(p, g.text, seconds) for p, g in zip(prompts, gens)]


def _result(prompt: PasskeyPrompt, answer: str, seconds: float) -> dict[str, Any]:
    found = first_integer(answer)
    return {"status": "ok", "key": prompt.key, "answer": answer, "found": found, "correct": found == prompt.key,
            "prompt_tokens": len(prompt.tokens), "key_token": prompt.key_start, "seconds": seconds}


class Passkey:
    """The passkey evaluation as the grid loop drives it."""

    kind = "passkey"

    def __init__(self, request: PasskeyRequest) -> None:
        self.request = request
        self.parallel = request.parallel
        self.settings = {"presets": list(request.presets), "lengths": list(request.lengths),
                         "depths": list(request.depths), "trials": request.trials, "seed": request.seed,
                         "answer_tokens": ANSWER_TOKENS}

    def cells(self, resolved: Resolved, model: str) -> list[tuple[Cell, Key]]:
        r = self.request
        return [({"length": n, "depth": d, "trial": t},
                 {"v": CACHE_VERSION, "kind": "passkey", "model": model,
                  "params": result_params(resolved.params_for(n)), "length": n, "depth": d, "trial": t,
                  "seed": r.seed, "answer_tokens": ANSWER_TOKENS, "prompt": PROMPT_SHA})
                for n in r.lengths for d in r.depths for t in range(r.trials)]

    def compute(self, engine: EvalEngine, resolved: Resolved, todo: list[tuple[Cell, Key]],
                progress: Progress) -> Iterator[tuple[Cell, Key, dict[str, Any]]]:
        prefix = bos_prefix(engine)

        def tokenize(text: str) -> list[int]:
            return engine.tokenize(text, add_bos=False)

        jobs = [(cell, key, build_passkey_prompt(tokenize, prefix, cell["length"] - ANSWER_TOKENS, cell["depth"],
                                                 passkey_key(self.request.seed, cell["trial"])))
                for cell, key in todo]
        # An adaptive engine's window follows the length, so lengths come in order: one switch each.
        # (Each cell evaluates its prompt after the task line: no prefix is shared between cells.)
        jobs.sort(key=lambda job: (job[0]["length"], job[0]["depth"], job[0]["trial"]))
        n = getattr(engine, "n_seq", 1)
        if n == 1:
            for cell, key, prompt in jobs:
                yield cell, key, passkey_cell(engine, prompt)
            return
        for group in same_step_groups(engine, jobs, n):
            yield from zip([c for c, _, _ in group], [k for _, k, _ in group], passkey_cells(engine, [p for *_, p in group]))

    def describe(self, cell: Cell, found: dict[str, Any]) -> str:
        verdict = "ok" if found["correct"] else "wrong"
        return f"{verdict} (answer {str(found.get('answer', '')).strip()!r})"

    def order(self, cell: Cell) -> tuple[Any, ...]:
        return (cell["length"], cell["depth"], cell["trial"])


def run_passkey(request: PasskeyRequest, spec: RunSpec | Resolved = RunSpec(), *, cache: CellCache | None = None,
                engine_factory: EngineFactory = open_eval_engine, progress: Progress = lambda _: None,
                compute: bool = True, executor: Executor | None = None) -> EvalResult:
    """Passkey retrieval for every (preset, length, depth, trial) cell, cached like `run_ppl`."""
    return run_grid(Passkey(request), request.presets, spec, cache=cache, engine_factory=engine_factory,
                    progress=progress, compute=compute, executor=executor)


def passkey_accuracy(cells: Sequence[Cell]) -> dict[tuple[str, int, float], float | None]:
    """Mean accuracy per (preset, length, depth) over trials; None for n/a cells."""
    groups: dict[tuple[str, int, float], list[bool]] = {}
    for c in cells:
        bucket = groups.setdefault((c["preset"], c["length"], c["depth"]), [])
        if c["status"] == "ok":
            bucket.append(bool(c["correct"]))
    return {k: (sum(v) / len(v) if v else None) for k, v in groups.items()}
