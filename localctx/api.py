"""The public Python API: what a program needs without the CLI. Everything here is exported from
`localctx` itself (`import localctx`); the CLI commands call the same functions' building blocks.

Run options, wherever a function loads a model (`**run` below): `ctx`, `cache_type` ("f16",
"q8_0", "q4_0"), `flash_attn`, `device` ("auto", "cpu", "cuda", "metal"), `gpu_layers` (a count,
"all" or None), `threads`, `force` (skip the memory refusal), `verbose` (llama.cpp's log).

Scale-out, wherever a function runs a batch (`summarize_files`, `evaluate_perplexity`,
`evaluate_passkey`, `evaluate_ruler`): `workers=N` runs it on N worker processes of a local Ray runtime (the CPU
threads shared between them), `ray_address="HOST:PORT"` (or "auto": $RAY_ADDRESS) on an existing
Ray cluster whose nodes see the model file. This process alone writes the store, the output and
the cache; the results are the same as in one process. Needs `pip install "localctx[ray]"`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import engine as _engine  # noqa: F401  llama.cpp before numpy: see cli.MODEL_COMMANDS
from .chat import ChatSession
from .cluster import Cluster
from .convert import ConversionResult, convert
from .engine import Engine, Generation
from .errors import InputError
from .evaluate import (CellCache, EvalResult, PasskeyRequest, PplRequest, RulerRequest, Summary, load_text, parse_depths,
                       parse_lengths, parse_tasks, run_passkey, run_ppl, run_ruler, summarize)
from .executor import Executor
from .gguf_meta import ModelFacts
from .kvcache import Entry, KVStore
from .memory import MemoryEstimate, estimate
from .generate import GenerateRequest, generate
from .params import MAX_SEED, GpuLayers, RuntimeParams
from .runtime import DEFAULT_PRESET, RunSpec, model_facts, open_engine, resolve_spec
from .summarize import BatchResult, Reporter, SummarizeOptions, summarize_batch

ModelRef = str | os.PathLike[str] | None  # None: the default model; a GGUF path or a models-directory name


def open_model(model: ModelRef = None, preset: str = DEFAULT_PRESET, *, ctx: int | None = None,
               cache_type: str | None = None, flash_attn: bool | None = None, device: str = "auto",
               gpu_layers: GpuLayers = None, threads: int | None = None, force: bool = False,
               verbose: bool = False, seed: int = 0, kv_cache: bool = True,
               swa_full: bool | None = None) -> Engine:
    """Load a model at a preset's context: resolved against its GGUF metadata, checked against the
    memory available (refused with what would fit, unless `force`), then loaded by llama.cpp.

    With `preset="auto"` the model is adaptive: each request runs at the smallest step of the
    preset's ladder that holds it (unscaled while it fits the trained context, YaRN beyond, up to
    `ctx`, default 4x the trained context); memory is checked for the largest step.

    Use it as a context manager, or call `.close()`:

        with localctx.open_model(preset="yarn-32k") as model:
            print(localctx.generate_text(model, "The capital of France is", max_tokens=8).text)

    With `kv_cache` (the default), a long document given to `generate_text` or attached to a chat
    is saved as a KV snapshot after it is evaluated, and restored by any later prompt that starts
    with it under the same model and parameters (see `kv_snapshots`).

    `swa_full`: on models with sliding-window layers, cache the whole context for them too (default:
    the preset's, off: their window only; memory, not results, differs).
    """
    spec = RunSpec(model=_model(model), preset=preset, ctx=ctx, cache_type=cache_type, flash_attn=flash_attn,
                   device=device, gpu_layers=gpu_layers, threads=threads, force=force, verbose=verbose,
                   kv_cache=kv_cache, swa_full=swa_full)
    return open_engine(spec, seed=_seed(seed))


def read_model_facts(model: ModelRef = None) -> ModelFacts:
    """What a GGUF header says (architecture, trained context, RoPE, layers, heads...). Reads the
    header only, never the weights."""
    return model_facts(_model(model))


def resolve_preset(preset: str = DEFAULT_PRESET, model: ModelRef = None, *, ctx: int | None = None,
                   cache_type: str | None = None, flash_attn: bool | None = None) -> RuntimeParams:
    """The exact llama.cpp parameters a preset gives on a model (`.llama_flags()` prints them as
    llama-cli flags). Nothing is loaded."""
    spec = RunSpec(model=_model(model), preset=preset, ctx=ctx, cache_type=cache_type, flash_attn=flash_attn)
    return resolve_spec(spec).params


def estimate_memory(preset: str = DEFAULT_PRESET, model: ModelRef = None, *, ctx: int | None = None,
                    cache_type: str | None = None, flash_attn: bool | None = None,
                    swa_full: bool | None = None) -> MemoryEstimate:
    """What loading the model at this preset will take in memory (weights, KV cache, compute
    buffers): the estimate the memory refusal compares with what is available. `.to_dict()`
    gives its parts, the sliding-window layers' cache included."""
    spec = RunSpec(model=_model(model), preset=preset, ctx=ctx, cache_type=cache_type, flash_attn=flash_attn,
                   swa_full=swa_full)
    resolved = resolve_spec(spec)
    return estimate(resolved.facts, resolved.params)


def generate_text(model: Engine, prompt: str, *, document: str | os.PathLike[str] | None = None,
                  chat: bool = False, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0,
                  seed: int = 0, stream: bool = False) -> Generation:
    """Complete `prompt` (after `document`'s text, when given) on an open model. A prompt that does
    not fit the window raises ContextOverflowError with the counts; nothing is truncated.

    With `stream=True` iterate over the result for text as it is generated; otherwise it is
    finished: `.text`, `.finish_reason` and `.timings` are final."""
    request = GenerateRequest(prompt, Path(document) if document is not None else None, chat, system, max_tokens,
                              temperature, _seed(seed))
    gen = generate(model, request)
    return gen if stream else gen.finish()


def start_chat(model: Engine, *, system: str | None = None, max_tokens: int = 512, temperature: float = 0.7,
               seed: int = 0) -> ChatSession:
    """A conversation in the model's own chat template: `.ask(text)` returns each reply, `.attach(path)`
    adds a document, `.save(path)` / `.load(path)` keep it. The KV cache is reused turn to turn; on an
    `auto` model the window grows a step when a turn needs it (the conversation is evaluated again,
    `model.switches` records each change) and `.clear()` returns to the smallest."""
    return ChatSession(model, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed)


def convert_model(source: str | os.PathLike[str], out: str | os.PathLike[str], preset: str, *,
                  ctx: int | None = None, dry_run: bool = False, force: bool = False, verify: bool = False,
                  verify_text: str | None = None, verify_tokens: int | None = None) -> ConversionResult:
    """Write `out`: a copy of `source` whose metadata carries the preset, so any llama.cpp-based
    runtime runs it at the extended window with no flags. Atomic: a failure leaves no `out`.
    With `verify`, `out` is published only if it alone gives the same logits as `source` with the preset."""
    return convert(source, out, preset, ctx=ctx, dry_run=dry_run, force=force, verify=verify,
                   verify_text=verify_text, verify_tokens=verify_tokens)


def summarize_files(paths: Sequence[str | os.PathLike[str]], *, model: ModelRef = None,
                    preset: str = DEFAULT_PRESET, out: str | os.PathLike[str] | None = None,
                    options: SummarizeOptions | None = None, reporter: Reporter | None = None,
                    engine: Engine | None = None, workers: int | None = None, ray_address: str | None = None,
                    **run: Any) -> BatchResult:
    """Summarize files, directories and glob patterns: one pass when a document fits the window,
    map-reduce when not. Finished work is stored, so a repeated or interrupted batch resumes.
    With `out`, writes a Markdown file per input and `summaries.jsonl` there. Pass an open `engine`
    to reuse a loaded model (then `model`, `preset` and `run` are not used). `workers` /
    `ray_address`: run on Ray workers (see the module docstring)."""
    spec = RunSpec(model=_model(model), preset=preset, **run)
    return summarize_batch([str(p) for p in paths], spec, options or SummarizeOptions(),
                           out=Path(out) if out is not None else None, reporter=reporter, engine=engine,
                           executor=executor_for(workers, ray_address))


def evaluate_perplexity(presets: Sequence[str], lengths: Sequence[int | str], *, model: ModelRef = None,
                        text: str | os.PathLike[str] | None = None, mode: str = "fixed", span: int = 256,
                        end: int | None = None, max_chunks: int | None = None, parallel: int = 1,
                        use_cache: bool = True, progress: Callable[[str], None] | None = None,
                        workers: int | None = None, ray_address: str | None = None, **run: Any) -> EvalResult:
    """Perplexity of each preset against context length (lengths as 8192 or "8k"). Fixed mode scores
    the same `span` tokens after each length of context; "chunks" is llama-perplexity's method.
    Cells are cached (resumable) unless `use_cache` is False. `text` defaults to the shared corpus.
    `workers` / `ray_address`: compute the cells on Ray workers (see the module docstring).
    `parallel`: cells of one window (chunks: windows of a cell) at once, as sequences sharing
    batches (the same results)."""
    executor = executor_for(workers, ray_address)
    request = PplRequest(list(presets), _lengths(lengths), load_text(text), mode=mode, span=span, end=end,
                         max_chunks=max_chunks, parallel=parallel)
    return run_ppl(request, RunSpec(model=_model(model), **run), cache=CellCache(enabled=use_cache),
                   progress=progress or _quiet, executor=executor)


def evaluate_passkey(presets: Sequence[str], lengths: Sequence[int | str],
                     depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), *, trials: int = 1, seed: int = 0,
                     parallel: int = 1, model: ModelRef = None, use_cache: bool = True, progress: Callable[[str], None] | None = None,
                     workers: int | None = None, ray_address: str | None = None, **run: Any) -> EvalResult:
    """Passkey retrieval: a number hidden at each depth of exactly `length` tokens of filler, asked
    for at the end, `trials` keys per cell. Cached like `evaluate_perplexity`, and like it run on Ray
    workers with `workers` / `ray_address`. `parallel`: cells of one window at once, as sequences of
    one batch (the same answers), on each worker with `workers` / `ray_address`."""
    executor = executor_for(workers, ray_address)
    depths = parse_depths(",".join(str(d) for d in depths))  # the CLI's rule, in one place
    request = PasskeyRequest(list(presets), _lengths(lengths), depths, trials, seed, parallel)
    return run_passkey(request, RunSpec(model=_model(model), **run), cache=CellCache(enabled=use_cache),
                       progress=progress or _quiet, executor=executor)


def evaluate_ruler(presets: Sequence[str], lengths: Sequence[int | str], *, tasks: Sequence[str] | str = "all",
                   samples: int = 5, depths: Sequence[float] | None = None, seed: int = 0, prompt_format: str = "auto",
                   text: str | os.PathLike[str] | None = None, threshold: float = 0.85, parallel: int = 1,
                   model: ModelRef = None, use_cache: bool = True, compute: bool = True,
                   progress: Callable[[str], None] | None = None, workers: int | None = None,
                   ray_address: str | None = None, **run: Any) -> tuple[EvalResult, Summary]:
    """RULER-style tasks (needle retrieval, variable tracking, word extraction, long-document QA;
    `tasks` as names, "niah" or "all") at each length, `samples` per task, length and depth
    (`depths` None: a random depth per sample, as RULER). Returns the cells and their summary:
    mean scores, each preset's effective length (against `native` at the shortest length, kept
    to `threshold`), retrieval, QA and short-text scores. Cached and run on Ray like the others;
    `compute=False` only reports what is cached (`localctx eval report`)."""
    if not 0 < threshold <= 1:
        raise InputError(f"threshold must be in (0, 1], not {threshold}.")
    executor = executor_for(workers, ray_address)
    names = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    depths = None if depths is None else parse_depths(",".join(str(d) for d in depths))
    request = RulerRequest(list(presets), _lengths(lengths), load_text(text), names, samples, depths, seed,
                           prompt_format, parallel, threshold)
    result = run_ruler(request, RunSpec(model=_model(model), **run), cache=CellCache(enabled=use_cache),
                       progress=progress or _quiet, compute=compute, executor=executor)
    return result, summarize(result, threshold)


def kv_snapshots() -> list[Entry]:
    """The KV snapshots on disk, most recently used first (`.to_dict()`: size, model, preset,
    tokens, last use). They live in the cache directory's `kv/` folder, bounded by
    $LOCALCTX_KV_CACHE_MAX (default 4G), least recently used out first."""
    return KVStore().entries()


def clear_kv_snapshots() -> tuple[int, int]:
    """Delete every KV snapshot; returns (files, bytes) removed."""
    return KVStore().clear()


def executor_for(workers: int | None = None, ray_address: str | None = None) -> Executor | None:
    """Where a batch runs: on Ray workers when `workers` or `ray_address` is given (validated here,
    before anything starts; Ray is imported only then), else None: in this process (the
    LocalExecutor that summarize and evaluate default to)."""
    cluster = Cluster.of(workers, ray_address)
    if cluster is None:
        return None
    from .distributed import RayExecutor

    return RayExecutor(cluster)


def _seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, not {seed}.")
    return seed


def _model(model: ModelRef) -> str | None:
    return None if model is None else os.fspath(model)


def _lengths(lengths: Sequence[int | str]) -> list[int]:
    return parse_lengths(",".join(str(n) for n in lengths))


def _quiet(_: str) -> None:
    pass
