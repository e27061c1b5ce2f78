"""convert: bake a context-extension preset into a new GGUF."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .output import echo_json
from ..options import json_option


@click.command()
@click.argument("source", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option("-p", "--preset", required=True, help="Preset to bake in (see `localctx presets list`), or 'native' to undo.")
@click.option("--ctx", type=click.IntRange(16), help="Target context in tokens (overrides the preset's; needed by 'auto').")
@click.option("--dry-run", is_flag=True, help="Print the metadata diff (key, old, new) and write nothing.")
@click.option("--verify", is_flag=True, help="Before publishing OUT, check that it alone gives the same logits as "
              "IN with the preset, on a prompt longer than the trained context.")
@click.option("--verify-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file for --verify's prompt [default: built-in text, repeated].")
@click.option("--verify-tokens", type=click.IntRange(2), help="Prompt length for --verify [default: trained context + 256].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
def convert(source: Path, out: Path, preset: str, ctx: int | None, dry_run: bool, verify: bool,
            verify_text: Path | None, verify_tokens: int | None, force: bool, as_json: bool) -> None:
    """Write OUT: a copy of the GGUF model IN whose metadata carries PRESET, so llama-server,
    Ollama or LM Studio run it at the extended context with no flags.

    Sets {arch}.context_length to the target (runtimes cap the window there) and the RoPE keys
    (YaRN: scaling type, factor, original context; linear: type and factor; NTK: freq_base).
    Per-dimension factors (a [rope_freqs] preset, or YaRN with tuned [yarn] values) go into the
    rope_freqs.weight tensor instead, on architectures whose llama.cpp loader applies it. Every
    other key and every other tensor byte is copied unchanged. Converting a converted file is
    relative to the original; `--preset native` restores the original metadata. The copy is
    atomic: an interrupted run leaves no OUT (a SIGKILLed run may leave `.OUT.localctx-tmp-*`,
    removed by the next conversion to OUT).

    \b
    Examples:
      localctx convert model.gguf model-32k.gguf --preset yarn-32k --verify
      localctx convert model.gguf model-32k.gguf --preset yarn-32k --dry-run
      localctx convert model-32k.gguf model-again.gguf --preset native
    """
    from ..convert import convert as run_convert
    from ..documents import read_text

    text = read_text(verify_text) if verify_text else None  # a regular file, bounded, any encoding
    if verify and not as_json:
        click.echo("verifying: running the prompt through both files (this takes a while)...", err=True)
    result = run_convert(source, out, preset, ctx=ctx, dry_run=dry_run, force=force, verify=verify,
                         verify_text=text, verify_tokens=verify_tokens, progress=_progress_printer())
    if as_json:
        echo_json(result.to_dict())
        return
    render(result.to_dict())


def render(r: dict[str, Any]) -> None:
    """The diff table, then what was written and verified."""
    p = r["params"]
    click.echo(f"{r['input']} → {r['output']}: preset {r['preset']} ({r['method']}, "
               f"context {p['n_ctx']:,}, trained {p['trained_ctx']:,})")
    if not r["changes"]:
        click.echo("no metadata changes")
    width = max([len(c["key"]) for c in r["changes"]] + [3])
    if r["changes"]:
        click.echo(f"  {'key':<{width}}  {'old':<14}  new")
    for c in r["changes"]:
        click.echo(f"  {c['key']:<{width}}  {_show(c['old']):<14}  {_show(c['new'])}")
    t = r["tensor"]
    if t:
        click.echo(f"  tensor {t['name']}: {_show_factors(t['old'])} → {_show_factors(t['new'])}")
    for note in r["notes"]:
        click.echo(f"  note: {note}")
    if r["written"]:
        click.echo(f"wrote {r['output']} ({r['bytes']:,} bytes in {r['seconds']:.2f} s)")
    else:
        click.echo("dry run: nothing written")
    v = r["verify"]
    if v:
        accepted = (f"tolerance {v['tolerance']:g}" if v["noise_floor"] is None else
                    f"accepted up to {v['threshold']:.3g}, from a noise floor of {v['noise_floor']:.3g}")
        click.echo(f"verified: max |Δlogit| = {v['max_abs_diff']:.3g} at positions {v['positions']} of "
                   f"{v['tokens']:,} tokens ({accepted})")


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} values]"
    return "-" if value is None else (f"{value:.10g}" if isinstance(value, float) else str(value))


def _show_factors(values: list[float] | None) -> str:
    if values is None:
        return "absent"
    return f"{len(values)} F32 factors, {min(values):.4g} to {max(values):.4g}"


def _progress_printer():  # -> Callable[[int, int], None] | None
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        click.echo(f"\rcopying tensor data {done * 100 // max(total, 1):3d}%", err=True, nl=done >= total)

    return show


def register(group: click.Group) -> None:
    group.add_command(convert)
