"""tune: search a model's own YaRN parameters for a target length, and write them as a preset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .output import echo_json
from ..executor import Executor
from ..options import cluster_options, json_option, run_options
from ..runtime import RunSpec


@click.command("tune")
@click.option("--target", required=True, metavar="LENGTH", help="The length to tune for: tokens, or 16k, 32k (k = 1024).")
@click.option("--method", type=click.Choice(["yarn", "rope-freqs"]), default="yarn", show_default=True,
              help="yarn: YaRN's beta_fast, beta_slow, ext_factor and scale. rope-freqs: per-dimension RoPE "
                   "factors (a monotone curve) and an attention factor, each trial a converted copy of the model.")
@click.option("--trials", type=click.IntRange(1), default=24, show_default=True,
              help="Trials in all, the default YaRN first; a rerun resumes or, when done, computes nothing.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Text to tune on [default: ../shared/corpus/pride_and_prejudice.txt in a checkout].")
@click.option("--name", help="The preset is written as tuned-NAME [default: MODEL-METHOD-TARGET].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the search and the retrieval tasks.")
@click.option("--span", type=click.IntRange(1), default=256, show_default=True,
              help="Perplexity: tokens scored at the end of the target length.")
@click.option("--retrieval", default="niah_single_2,niah_multikey_1", show_default=True,
              help="Needle tasks of `eval ruler` a trial must do as well as the default on.")
@click.option("--samples", type=click.IntRange(1), default=3, show_default=True, help="Samples per retrieval task.")
@click.option("--batch", type=click.IntRange(1), help="Trials evaluated at once, as one grid [default: --workers, else 1].")
@run_options(preset=False, ctx=False)
@cluster_options
@json_option
def tune(spec: RunSpec, executor: Executor | None, target: str, method: str, trials: int, text_file: Path | None,
         name: str | None, seed: int, span: int, retrieval: str, samples: int, batch: int | None,
         as_json: bool) -> None:
    """Search YaRN's parameters (or per-dimension RoPE factors) for one target length on your model
    and text; write the best as preset tuned-NAME (YaRN: use it as --preset tuned-NAME; factors:
    bake them with `localctx convert MODEL OUT --preset tuned-NAME`).

    Objective: perplexity at the target on the text (the last SPAN tokens), among the trials whose
    needle retrieval at the target is at least the default YaRN's. Optuna's TPE sampler proposes
    the trials; each is made of eval cells, cached, so an interrupted search resumes. With
    --workers / --ray, BATCH trials are evaluated at once on the workers.

    \b
    Examples:
      localctx tune --target 32k --trials 24
      localctx tune --target 16k --trials 12 --text book.txt --name book-16k
      localctx tune --target 32k --trials 24 --workers 2
      localctx tune --target 32k --method rope-freqs --trials 24
    """
    from ..evaluate import load_text, parse_lengths, parse_tasks
    from ..tune import TuneRequest
    from ..tune import tune as run_tune

    lengths = parse_lengths(target)
    if len(lengths) != 1:
        raise click.BadParameter("give one length", param_hint="--target")
    request = TuneRequest(lengths[0], load_text(text_file), method, trials, name, seed, span, parse_tasks(retrieval),
                          samples, batch or getattr(getattr(executor, "cluster", None), "workers", None) or 1)
    result = run_tune(request, spec, progress=lambda m: click.echo(m, err=True), executor=executor)
    if as_json:
        echo_json(result.to_dict())
        return
    render(result.to_dict())


def render(r: dict[str, Any]) -> None:
    names = list(r["trials"][0]["values"]) if r["trials"] else []
    click.echo(f"{'trial':>5}" + "".join(f"{n:>12}" for n in names) + f"{'ppl':>10}{'retrieval':>10}")
    for t in r["trials"]:
        mark = "" if t["feasible"] else "  below the default's retrieval"
        click.echo(f"{t['number']:>5}" + "".join(f"{t['values'][n]:>12.4g}" for n in names)
                   + f"{t['ppl']:>10.3f}{t['retrieval']:>10.2f}{mark}")
    best, default, gain = r["best"], r["default"], r["gain"]
    change = "no better than the default" if not gain else f"{abs(gain):.1%} {'lower' if gain > 0 else 'higher'}"
    click.echo(f"best: trial {best['number']}, ppl {best['ppl']:.3f} against the default's {default['ppl']:.3f} "
               f"({change}), retrieval {best['retrieval']:.2f} against {default['retrieval']:.2f}")
    if "beta_fast" in best["values"]:
        click.echo(f"preset: {r['preset']} (--preset tuned-{r['name']})")
    else:
        click.echo(f"preset: {r['preset']} (per-dimension factors: bake them with "
                   f"`localctx convert MODEL OUT.gguf --preset tuned-{r['name']}`)")


def register(group: click.Group) -> None:
    group.add_command(tune)
