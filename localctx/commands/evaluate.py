"""The `eval` group: perplexity against context length, and passkey retrieval, per preset."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .output import echo_json
from ..executor import Executor
from ..options import cluster_options, json_option, parallel_option, run_options
from ..runtime import RunSpec

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_PRESETS = "extrapolate-32k,linear-32k,ntk-32k,yarn-32k"
RULER_PRESETS = "native,yarn-16k,yarn-32k,ntk-32k,self-extend-32k,auto"


def eval_options(f: F) -> F:
    """Options shared by the evaluations; the model and run options are gathered into `spec`."""
    return grid_options(DEFAULT_PRESETS)(f)


def grid_options(presets: str, compute: bool = True) -> Callable[[F], F]:
    """The grid's options, with `presets` as the default list; without `compute`, only what
    names the cells and how to show them (a report computes nothing)."""
    def decorate(f: F) -> F:
        for option in reversed(_grid_options(presets, compute)):
            f = option(f)
        return f
    return decorate


def _grid_options(presets: str, compute: bool) -> list[Callable[[F], F]]:
    if not compute:
        return [click.option("--presets", default=presets, show_default=True, help="Comma-separated presets to compare."),
                click.option("--lengths", default="2k,4k,8k,16k,32k", show_default=True,
                             help="Comma-separated context lengths in tokens (k = 1024)."),
                run_options(preset=False, ctx=False), json_option]
    return [
        click.option("--presets", default=presets, show_default=True, help="Comma-separated presets to compare."),
        click.option("--lengths", default="2k,4k,8k,16k,32k", show_default=True,
                     help="Comma-separated context lengths in tokens (k = 1024)."),
        run_options(preset=False, ctx=False),
        cluster_options,
        click.option("--no-cache", is_flag=True, help="Recompute every cell (finished cells are still saved)."),
        click.option("--cached-only", is_flag=True, help="Compute nothing: report finished cells, '-' for the rest."),
        json_option,
        click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per cell."),
        click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
                     help="Also draw the results to this image (needs matplotlib)."),
    ]


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _check_plot(plot_file: Path | None) -> None:
    """A --plot FILE that cannot be written fails now, not after the whole evaluation."""
    if plot_file:
        from ..evaluate.render import check_plot_path

        check_plot_path(plot_file)


def _render(result: Any, table: Callable[[Any], str], as_json: bool, as_csv: bool, plot_file: Path | None,
            extra: dict[str, Any] | None = None) -> None:
    from ..evaluate import plot, to_csv

    if as_json:
        echo_json({**result.to_dict(), **(extra or {})})
    elif as_csv:
        click.echo(to_csv(result), nl=False)
    else:
        click.echo(table(result))
    if plot_file:
        click.echo(f"plot written to {plot(result, plot_file)}", err=True)
    click.echo(f"{result.computed} cell(s) computed, {len(result.cells) - result.computed} cached or n/a", err=True)


@click.group("eval")
def eval_group() -> None:
    """Measure how each context-extension preset works on a model: perplexity, passkey, RULER-style tasks.

    Finished cells are cached per model, preset, length and text, so an interrupted run resumes
    where it stopped and a repeated one is instant.

    \b
    Examples:
      localctx eval ppl --presets native,yarn-32k --lengths 2k,8k,32k --plot ppl.png
      localctx eval passkey --presets yarn-32k --lengths 8k,16k --depths 0,0.5,1
      localctx eval ruler --presets native,yarn-32k --lengths 2k,8k,16k --summary
      localctx eval report
    """


@eval_group.command("ppl")
@eval_options
@click.option("--text", "text_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Plain-text file to score [default: ../shared/corpus/pride_and_prejudice.txt in a checkout].")
@click.option("--mode", type=click.Choice(["fixed", "chunks"]), default="fixed", show_default=True,
              help="fixed: one span scored after each length of context; chunks: llama-perplexity's method.")
@click.option("--span", type=click.IntRange(1), default=256, show_default=True, help="fixed: tokens scored.")
@click.option("--end", type=click.IntRange(1), help="fixed: text token where the span ends [default: the largest length].")
@click.option("--ctx", type=click.IntRange(16), help="chunks: window size (shorthand for --lengths N).")
@click.option("--chunks", "max_chunks", type=click.IntRange(1), help="chunks: score at most this many windows.")
@parallel_option(1, "Cells of one window (chunks: windows of a cell; the same results as one at a time)")
def ppl(spec: RunSpec, executor: Executor | None, presets: str, lengths: str, no_cache: bool, cached_only: bool, as_json: bool, as_csv: bool,
        plot_file: Path | None, text_file: Path | None, mode: str, span: int, end: int | None, ctx: int | None,
        max_chunks: int | None, parallel: int) -> None:
    """Perplexity against context length, one row per preset.

    In fixed mode the same target span (the SPAN tokens ending at token END) is scored after
    each LENGTH of preceding context, so only the amount of context varies. A length above a
    preset's window is reported as n/a; nothing is ever truncated. In chunks mode each length
    is a window size and the text is scored as llama.cpp's llama-perplexity does (consecutive
    windows, second half of each scored), so the numbers can be checked against that tool.

    \b
    Examples:
      localctx eval ppl --presets extrapolate-32k,linear-32k,ntk-32k,yarn-32k --lengths 8k,16k,32k
      localctx eval ppl --presets native --lengths 2k,4k,8k --text book.txt --csv
      localctx eval ppl --presets native,yarn-32k --mode chunks --ctx 512 --chunks 20 --json
      localctx eval ppl --presets native,yarn-32k --lengths 2k,4k,8k --workers 4
      localctx eval ppl --presets native --lengths 1k,2k,3k,4k,5k,6k --parallel 6
    """
    from ..evaluate import CellCache, PplRequest, load_text, parse_lengths, parse_presets, ppl_table, run_ppl

    _check_plot(plot_file)
    request = PplRequest(parse_presets(presets), [ctx] if ctx else parse_lengths(lengths), load_text(text_file),
                         mode=mode, span=span, end=end, max_chunks=max_chunks, parallel=parallel)
    result = run_ppl(request, spec, cache=CellCache(enabled=not no_cache), progress=_progress,
                     compute=not cached_only, executor=executor)
    _render(result, ppl_table, as_json, as_csv, plot_file)


@eval_group.command("passkey")
@eval_options
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True,
              help="Where the key goes: fractions of the filler, 0 = start, 1 = just before the question.")
@click.option("--trials", type=click.IntRange(1), default=1, show_default=True, help="Keys per cell.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the keys.")
@parallel_option(1, "Cells of one window", "The same results as one at a time. With --workers / --ray: on each worker.")
def passkey(spec: RunSpec, executor: Executor | None, presets: str, lengths: str, no_cache: bool, cached_only: bool, as_json: bool,
            as_csv: bool, plot_file: Path | None, depths: str, trials: int, seed: int, parallel: int) -> None:
    """Passkey retrieval: can the model repeat a number hidden in LENGTH tokens of filler?

    Each cell is exactly LENGTH tokens: the prompt (task line, filler with the key sentence at
    the given depth, question) plus 8 greedily decoded answer tokens. A cell scores 1 when the
    first integer of the answer is the key.

    \b
    Examples:
      localctx eval passkey --presets yarn-32k,linear-32k --lengths 8k,16k,32k --depths 0,0.5,1
      localctx eval passkey --presets native --lengths 2k,4k --trials 5 --seed 1 --plot passkey.png
      localctx eval passkey --presets yarn-32k --lengths 8k,16k --depths 0,0.5,1 --ray auto
      localctx eval passkey --presets native --lengths 2k --trials 6 --parallel 6
    """
    from ..evaluate import (CellCache, PasskeyRequest, parse_depths, parse_lengths, parse_presets, passkey_table,
                            run_passkey)

    _check_plot(plot_file)
    request = PasskeyRequest(parse_presets(presets), parse_lengths(lengths), parse_depths(depths), trials, seed,
                             parallel)
    result = run_passkey(request, spec, cache=CellCache(enabled=not no_cache), progress=_progress,
                         compute=not cached_only, executor=executor)
    _render(result, passkey_table, as_json, as_csv, plot_file)


def ruler_task_options(f: F) -> F:
    """What names a RULER-style cell besides its preset and length (shared by `ruler` and `report`)."""
    options = [
        click.option("--tasks", default="all", show_default=True,
                     help="Comma-separated tasks, 'niah' for the needle tasks, or 'all': "
                          "niah_single_1/2/3, niah_single_word, niah_multikey_1/2/3, niah_multivalue, "
                          "niah_multiquery, vt, cwe, fwe, qa."),
        click.option("--samples", type=click.IntRange(1), default=5, show_default=True,
                     help="Samples per task, length and depth."),
        click.option("--depths", default="random", show_default=True,
                     help="Where the needle (and the QA fact) goes: 'random' (one of RULER's 40 depths per "
                          "sample) or fractions, 0 = start of the text, 1 = its end."),
        click.option("--seed", type=int, default=0, show_default=True, help="Chooses keys, values and texts."),
        click.option("--format", "prompt_format", type=click.Choice(["auto", "chat", "raw"]), default="auto",
                     show_default=True, help="auto: the model's chat template when it has one, else raw text."),
        click.option("--text", "text_file", type=click.Path(path_type=Path), metavar="FILE",
                     help="The haystack text [default: ../shared/corpus/pride_and_prejudice.txt in a checkout]."),
        click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.85, show_default=True,
                     help="Effective length: the longest length whose mean score, and every shorter one's, is at "
                          "least this share of native's at the shortest length."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _ruler_request(presets: str, lengths: str, tasks: str, samples: int, depths: str, seed: int, prompt_format: str,
                   text_file: Path | None, threshold: float, parallel: int = 1) -> Any:
    from ..evaluate import RulerRequest, load_text, parse_depths, parse_lengths, parse_presets, parse_tasks

    return RulerRequest(parse_presets(presets), parse_lengths(lengths), load_text(text_file), parse_tasks(tasks),
                        samples, None if depths.strip() == "random" else parse_depths(depths), seed, prompt_format,
                        parallel, threshold)


@eval_group.command("ruler")
@grid_options(RULER_PRESETS)
@ruler_task_options
@click.option("--summary", is_flag=True, help="Also print the comparison table (as `localctx eval report`).")
@parallel_option(1, "Samples of one window", "The same answers as one at a time. With --workers / --ray: on each worker.")
def ruler(spec: RunSpec, executor: Executor | None, presets: str, lengths: str, no_cache: bool, cached_only: bool,
          as_json: bool, as_csv: bool, plot_file: Path | None, tasks: str, samples: int, depths: str, seed: int,
          prompt_format: str, text_file: Path | None, threshold: float, summary: bool, parallel: int) -> None:
    """RULER-style tasks: how far does each preset really reach?

    Needle retrieval (single, multi-key with distractors, multi-value, multi-query), variable
    tracking, common- and frequent-word extraction (NVIDIA/RULER's synthetic tasks) and
    long-document QA, built from the given text and seeded random values, at exact lengths.
    Scored as RULER scores them (the share of expected strings in the answer; QA: token F1).
    The table gives each preset's mean per task family and length, and its effective length:
    the longest length whose mean stays at least THRESHOLD x native's at the shortest length.

    \b
    Examples:
      localctx eval ruler --lengths 2k,4k,8k --samples 5 --summary
      localctx eval ruler --presets native,yarn-32k --lengths 2k,16k --tasks niah,qa --plot ruler.png
      localctx eval ruler --presets native --lengths 1k --tasks qa --depths 0,0.5,1 --samples 3
      localctx eval ruler --presets yarn-32k --lengths 16k,32k --workers 2
    """
    from ..evaluate import CellCache, report_table, ruler_table, run_ruler, summarize

    _check_plot(plot_file)
    request = _ruler_request(presets, lengths, tasks, samples, depths, seed, prompt_format, text_file, threshold,
                             parallel)
    result = run_ruler(request, spec, cache=CellCache(enabled=not no_cache), progress=_progress,
                       compute=not cached_only, executor=executor)
    found = summarize(result, threshold)
    table = (lambda r: ruler_table(r, threshold) + "\n\n" + report_table(found)) if summary else \
        (lambda r: ruler_table(r, threshold))
    _render(result, table, as_json, as_csv, plot_file, {"summary": found.to_dict()})


@eval_group.command("report")
@grid_options(RULER_PRESETS, compute=False)
@ruler_task_options
def report(spec: RunSpec, presets: str, lengths: str, as_json: bool, tasks: str, samples: int, depths: str,
           seed: int, prompt_format: str, text_file: Path | None, threshold: float) -> None:
    """The comparison table of `eval ruler`'s cached cells: per preset, retrieval, long-document QA,
    the short-text score beside native's, and the effective length. Computes nothing: a cell not
    run yet is '-'. Give the grid as `eval ruler` was given it.

    \b
    Examples:
      localctx eval report
      localctx eval report --presets native,yarn-32k --lengths 2k,4k,8k --json
    """
    from ..evaluate import CellCache, report_table, run_ruler, summarize

    request = _ruler_request(presets, lengths, tasks, samples, depths, seed, prompt_format, text_file, threshold)
    result = run_ruler(request, spec, cache=CellCache(), compute=False)
    found = summarize(result, threshold)
    if as_json:
        echo_json({"model": result.model, "settings": result.settings, "summary": found.to_dict()})
    else:
        click.echo(report_table(found))
    done = sum(c["status"] == "ok" for c in result.cells)
    click.echo(f"{done} of {len(result.cells)} cell(s) cached", err=True)


def register(group: click.Group) -> None:
    group.add_command(eval_group)
