"""inspect, presets, models, doctor and generate."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .output import echo_json
from ..memory import human
from ..options import ctx_option, json_option, model_option, run_options, seed_option
from ..runtime import RunSpec


@click.command()
@click.argument("model", required=False)
@json_option
def inspect(model: str | None, as_json: bool) -> None:
    """Show what a GGUF file says about its context: positions, RoPE, KV cache cost, presets.

    Reads the header only (no weights), so it is instant even for a 70 GB file.
    MODEL defaults to the embedded SmolLM2-135M-Instruct.

    \b
    Example:
      localctx inspect ~/models/llama-3.1-8b.Q4_K_M.gguf --json
    """
    from ..report import inspect_model

    report = inspect_model(model)
    warn_skipped_presets()
    if as_json:
        echo_json(report)
        return
    render_inspect(report)


def render_inspect(r: dict[str, Any]) -> None:
    row = lambda k, v: click.echo(f"{k:<26}{v}")  # noqa: E731
    row("file", f"{r['path']} ({human(r['file_size'])})")
    row("name", r["name"])
    row("architecture", r["architecture"])
    row("quantization", r["quantization"])
    row("positions", {"rope": "RoPE", "alibi": "ALiBi", "learned": "learned absolute", "none": "none"}[r["positions"]])
    row("trained context", f"{r['trained_context']:,} tokens")
    if r["context_length"] != r["trained_context"]:
        row("context in file", f"{r['context_length']:,} tokens")
    if r["rope_freq_base"] is not None:
        row("rope freq base", f"{r['rope_freq_base']:g}")
        row("rope dimensions", r["rope_dimension_count"])
    s = r["rope_scaling"]
    row("rope scaling in file", f"{s['type']} ×{s['factor']:g} from {s['original_context']:,}" if s else "none")
    f = r["rope_freqs"]
    if f:
        attn = f", attention factor {f['attn_factor']:g}" if f["attn_factor"] else ""
        row("rope factors in file", f"rope_freqs.weight: {f['count']} per-dimension factors, "
                                    f"{f['min']:g} to {f['max']:g}{attn}")
    p = r["converted_by_localctx"]
    if p:
        row("converted by", f"{p['tool']} {p['version']}, preset {p['preset']} ({p['method']}) from {p['source_file']}")
        row("original", f"context {p['original_context']:,}, rope base {p['original_freq_base']}, scaling {p['original_scaling']}")
    row("layers", r["layers"])
    row("attention heads", f"{r['attention_heads']} (KV heads {r['kv_heads']}), head dim {r['head_dim']}")
    per = r["kv_cache_bytes_per_token"]
    row("KV cache per token", ", ".join(f"{t} {human(b)}" for t, b in per.items()))
    sliding = r["sliding_window"]
    if sliding:
        row("sliding window", f"{sliding['tokens']:,} tokens ({sliding['kind']}) on {len(sliding['layers'])} "
                              f"of {r['layers']} layers")
        click.echo("KV cache total (sliding layers keep their window; with --swa-full, the whole context):")
        full = sliding["kv_cache_bytes_swa_full"]
        click.echo(f"  {'tokens':>8}  " + "  ".join(f"{t:>10} {'swa-full':>10}" for t in per))
        for n, by_type in r["kv_cache_bytes"].items():
            click.echo(f"  {int(n):>8,}  " + "  ".join(f"{human(b):>10} {human(full[n][t]):>10}"
                                                      for t, b in by_type.items()))
    else:
        click.echo("KV cache total:")
        click.echo(f"  {'tokens':>8}  " + "  ".join(f"{t:>10}" for t in per))
        for n, by_type in r["kv_cache_bytes"].items():
            click.echo(f"  {int(n):>8,}  " + "  ".join(f"{human(b):>10}" for b in by_type.values()))
    click.echo("presets:")
    for name, info in r["presets"].items():
        mark = "yes" if info["applies"] else "no "
        click.echo(f"  {mark} {name:<18}{info['detail']}")


def warn_skipped_presets() -> None:
    """One line on stderr per preset file that does not load (listings skip it and go on)."""
    from ..presets import scan_presets

    _warn(scan_presets()[1])


def _warn(problems: list[Any]) -> None:
    for problem in problems:
        click.echo(f"Warning: skipped {problem.path}: {problem.reason}", err=True)


@click.group()
def presets() -> None:
    """List and resolve context-extension presets.

    \b
    Example:
      localctx presets show yarn-32k
    """


@presets.command("list")
@json_option
def presets_list(as_json: bool) -> None:
    """List shipped and user presets (user presets override shipped ones of the same name).

    \b
    Example:
      localctx presets list --json
    """
    from ..paths import user_presets_dir
    from ..presets import scan_presets

    items, problems = scan_presets()
    _warn(problems)
    if as_json:
        echo_json([{"name": p.name, "method": p.method, "target_ctx": p.target_ctx,
                    "description": p.description, "source": p.source} for p in items])
        return
    for p in items:
        target = f"{p.target_ctx:,}" if p.target_ctx else "-"
        click.echo(f"{p.name:<18}{p.method:<12}{target:>9}  {p.description}")
    click.echo(f"\nUser presets: {user_presets_dir()}", err=True)


@presets.command("show")
@click.argument("name")
@model_option
@ctx_option
@json_option
def presets_show(name: str, model: str | None, ctx: int | None, as_json: bool) -> None:
    """Resolve a preset against a model and print the llama.cpp parameters and flags.

    \b
    Example:
      localctx presets show yarn-32k --model converted.gguf
    """
    from ..memory import estimate
    from ..runtime import resolve_spec

    resolved = resolve_spec(RunSpec(model=model, preset=name, ctx=ctx))
    facts, params, ladder = resolved.facts, resolved.params, resolved.ladder
    flags = " ".join(params.llama_flags())
    memory = estimate(facts, params)
    if as_json:
        report = {"model": str(facts.path), "params": params.to_dict(), "llama_cli": f"llama-cli -m {facts.path} {flags}",
                  "llama_server": None if params.self_extend else f"llama-server -m {facts.path} {flags}",
                  "memory": memory.to_dict()}
        if ladder.adaptive:
            report["ladder"] = [{"params": step.to_dict(), "llama_flags": " ".join(step.llama_flags())}
                                for step in ladder.steps]
        echo_json(report)
        return
    click.echo(f"preset {name} on {facts.name} (trained context {facts.trained_context:,})")
    if ladder.adaptive:
        _render_ladder(ladder.steps)
        click.echo("\nthe largest step (memory is planned for it), as fixed parameters:")
    for key, value in params.to_dict().items():
        if key != "notes":
            click.echo(f"  {key:<18}{value}")
    for note in params.notes:
        click.echo(f"  note: {note}")
    click.echo(f"  {'memory':<18}about {human(memory.total)} (model {human(memory.model_bytes)}, KV cache "
               f"{human(memory.kv_bytes)}, compute {human(memory.compute_bytes)})")
    if params.self_extend:
        click.echo(SELF_EXTEND_NOTE.format(g=params.group_size, w=params.neighbor_window, t=params.trained_ctx))
        click.echo(f"\nllama-cli -m {facts.path} {flags}   (nearest llama.cpp equivalent; no llama-server flags)")
        return
    click.echo(f"\nllama-cli -m {facts.path} {flags}")
    click.echo(f"llama-server -m {facts.path} {flags}")


SELF_EXTEND_NOTE = """
what it does: RoPE is left as trained. While the input fits the trained context ({t:,} tokens)
nothing changes; past it, localctx's engine moves the oldest tokens to grouped positions (index // {g})
in the KV cache as it evaluates, as few as keep every position below {t:,}; the nearest tokens keep
exact positions, never fewer than {w:,} of them. A procedure at run time: `convert` cannot bake it.
llama.cpp's own --grp-attn-n/--grp-attn-w (llama-cli and llama-passkey only; llama-server dropped them)
group with a fixed window and use llama_memory_seq_div, which re-rotates keys the wrong way in the
llama.cpp this project builds (benchmarks/RESULTS.md section 9)."""


def _render_ladder(steps: Any) -> None:
    """auto's windows, smallest first: each request runs at the first that holds it."""
    click.echo("each request runs at the first step that holds its prompt and answer budget:")
    click.echo(f"  {'step':<5}{'window':>9}  {'method':<12}{'s':>5}  llama.cpp parameters")
    for i, step in enumerate(steps, 1):
        flags = " ".join(step.llama_flags()[2:])  # the window is its own column
        click.echo(f"  {i:<5}{step.n_ctx:>9,}  {step.method:<12}{step.scale:>5.3g}  {flags}")


@click.command()
@json_option
def models(as_json: bool) -> None:
    """List the default model and the GGUF files in the user's models directory.

    \b
    Example:
      localctx models
    """
    from ..paths import models_dir
    from ..report import list_models

    rows = list_models()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        tag = "(default) " if r["default"] else ""
        if "error" in r:
            click.echo(f"{tag}{r['path']}: {r['error']}")
        else:
            click.echo(f"{tag}{r['name']}  {r['architecture']} {r['quantization']}  "
                       f"ctx {r['trained_context']:,}  {human(r['file_size'])}  {r['path']}")
    click.echo(f"\nModels directory: {models_dir()}", err=True)


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """Print the llama.cpp build, its backends, CPU features and versions.

    \b
    Example:
      localctx doctor
    """
    from ..doctor import diagnose

    info = diagnose()
    if as_json:
        echo_json(info)
        return
    for key, value in info.items():
        click.echo(f"{key:<22}{value}")


@click.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", "document", type=click.Path(path_type=Path), help="Put this document before the prompt.")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("-t", "--temperature", type=click.FloatRange(0), default=0.0, show_default=True)
@seed_option
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", help="System prompt (with --chat).")
@run_options(kv_cache=True)
@json_option
def generate(spec: RunSpec, prompt: str | None, document: Path | None, max_tokens: int, temperature: float,
             seed: int, chat: bool, system: str | None, as_json: bool) -> None:
    """Complete PROMPT (or stdin) in one shot, streaming to stdout.

    Fails with the token counts, and a preset that would fit, when the prompt exceeds the window;
    nothing is ever truncated. A --file document of 2,048 tokens or more is kept as a KV snapshot
    after it is evaluated, so the next question about it skips it (see `localctx cache`).

    \b
    Examples:
      localctx generate "The capital of France is"
      localctx generate --preset yarn-32k --file book.txt "Who is the narrator?" --chat
    """
    from ..generate import GenerateRequest, generate as run, generation_report
    from ..kvcache import snapshot_notice
    from ..memory import GENERATE
    from ..runtime import open_engine

    if prompt is None:
        prompt = "" if (document and sys.stdin.isatty()) else read_stdin_text()
    if not prompt and document is None:
        raise click.UsageError("Give a PROMPT argument, a --file, or text on stdin.")
    request = GenerateRequest(prompt, document, chat, system, max_tokens, temperature, seed)
    with open_engine(spec, seed=seed, workload=GENERATE) as engine:
        gen = run(engine, request)
        for chunk in gen:
            if not as_json:
                click.echo(chunk, nl=False)
        if as_json:
            echo_json(generation_report(engine, gen))
        else:
            click.echo()
        kv = snapshot_notice(gen.timings)
        if kv:
            click.echo(kv, err=True)
        if engine.ladder.adaptive:  # which step the request ran at (in --json: its params)
            click.echo(f"[auto] {gen.timings.prompt_tokens:,} prompt tokens + {max_tokens:,} answer budget: "
                       f"{engine.params.scaling}, window {engine.n_ctx:,}", err=True)


def read_stdin_text() -> str:
    """All of stdin as text: bytes decoded with the documents' fallbacks (UTF-8, cp1252, Latin-1),
    so undecodable input is text, not a traceback; bounded like a document."""
    from ..documents import MAX_DOCUMENT_BYTES, decode_bytes
    from ..files import read_stream

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stdin (embedding): already decoded
        return sys.stdin.read()
    return decode_bytes(read_stream(stream, MAX_DOCUMENT_BYTES), "stdin")


def register(group: click.Group) -> None:
    for command in (inspect, presets, models, doctor, generate):
        group.add_command(command)
