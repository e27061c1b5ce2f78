"""summarize: long documents in one pass within the window, map-reduce beyond it."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import LocalctxError
from ..executor import Executor
from ..options import cluster_options, json_option, parallel_option, run_options
from ..runtime import RunSpec
from ..summary_store import dumps

DEFAULT_PARALLEL = 1  # one at a time: the answers promised (docs/architecture.md, parallel sequences)


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-o", "--out", type=click.Path(path_type=Path), metavar="DIRECTORY",  # checked by summarize_batch
              help="Write one Markdown file per input and summaries.jsonl here.")
@click.option("--strategy", type=click.Choice(["auto", "stuff", "map-reduce"]), default="auto", show_default=True,
              help="auto: one pass when the document fits the window (with --preset auto: while it needs "
                   "at most s = 2), else map-reduce.")
@click.option("--chunk-tokens", type=click.IntRange(64), help="Map chunk size in tokens [default: fill the window].")
@click.option("--overlap", type=click.IntRange(0), default=0, show_default=True,
              help="Tokens shared by neighbouring chunks.")
@click.option("--max-summary-tokens", type=click.IntRange(16), default=256, show_default=True,
              help="Answer budget of each model call.")
@click.option("--style", type=click.Choice(["general", "fiction"]), default="general", show_default=True,
              help="The built-in instruction: general (any document: its subject and main points) or fiction "
                   "(names the main characters and says what happens).")
@click.option("--prompt", help="Your own instruction instead of --style's.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the instruction from a file.")
@click.option("--retry-failed", is_flag=True, help="Retry documents that failed in an earlier run.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (warnings still show).")
@run_options(kv_cache=True)
@parallel_option(DEFAULT_PARALLEL, "Model calls (map chunks, or documents read in one pass)",
                 "The summaries are the same at any N. With --workers / --ray: on each worker.")
@cluster_options
@json_option
def summarize(spec: RunSpec, executor: Executor | None, paths: tuple[str, ...], out: Path | None, strategy: str,
              chunk_tokens: int | None, overlap: int, max_summary_tokens: int, style: str, prompt: str | None,
              prompt_file: Path | None, retry_failed: bool, quiet: bool, parallel: int, as_json: bool) -> None:
    """Summarize files, directories (recursively), glob patterns or - (stdin).

    A document that fits the window (instruction + text + answer) is read in one pass; a longer one
    is split at headings, paragraphs and sentences, each chunk summarized, and the partial
    summaries combined. With --preset auto each call runs at the scaling its length needs: chunks
    and documents within the trained context unscaled, a document up to twice it in one pass at
    YaRN s = 2, anything longer map-reduced over unscaled chunks. Finished work is cached by content, model, preset and prompt: re-running a
    batch does no model work, and a killed batch resumes where it stopped.

    With one input and no --out the summary goes to stdout; --out DIR writes DIR/<name>.md per
    input and DIR/summaries.jsonl; --json prints the JSON lines. Progress goes to stderr.

    \b
    Examples:
      localctx summarize report.txt --preset auto
      localctx summarize book.txt --preset yarn-32k --style fiction
      localctx summarize docs/ "notes/**/*.md" --preset yarn-32k --out summaries/
      cat report.txt | localctx summarize - --max-summary-tokens 128
      localctx summarize reports/ --out summaries/ --workers 4
      localctx summarize notes/ --out summaries/ --parallel 8
    """
    from ..errors import Interrupted
    from ..summarize import PROMPTS, SummarizeOptions, summarize_batch
    from ..summarize_progress import make_reporter

    if prompt and prompt_file:
        raise click.UsageError("Give --prompt or --prompt-file, not both.")
    if prompt_file:
        from ..documents import read_text

        prompt = read_text(prompt_file).strip()
    options = SummarizeOptions(strategy=strategy, chunk_tokens=chunk_tokens, overlap=overlap,
                               max_summary_tokens=max_summary_tokens, retry_failed=retry_failed, parallel=parallel,
                               prompt=prompt if prompt is not None else PROMPTS[style])
    on_record = (lambda r: click.echo(dumps(r))) if as_json else None
    reporter = make_reporter(quiet)
    try:
        result = summarize_batch(paths, spec, options, out=out, stdin=sys.stdin.buffer, reporter=reporter,
                                 on_record=on_record, executor=executor)
    except KeyboardInterrupt:
        raise Interrupted() from None
    finally:
        reporter.close()
    if not as_json and out is None:
        _print_summaries(result.records)
    elif out is not None and not quiet:
        click.echo(f"Wrote {len(result.out_files)} summaries and {out / 'summaries.jsonl'}", err=True)
    if result.stats.failed:
        raise LocalctxError(f"{result.stats.failed} of {result.stats.documents} documents failed (recorded; "
                            "re-run with --retry-failed to try them again).")


def _print_summaries(records: list[dict]) -> None:
    done = [r for r in records if r["status"] == "ok"]
    if len(done) == 1 and len(records) == 1:
        click.echo(done[0]["summary"])
        return
    for r in done:
        click.echo(f"# {r['path']}\n\n{r['summary']}\n")


def register(group: click.Group) -> None:
    group.add_command(summarize)
