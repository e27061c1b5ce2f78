"""Shared Click option decorators (the library never imports Click)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .runtime import DEFAULT_PRESET, RunSpec

F = TypeVar("F", bound=Callable[..., Any])


def _gpu_layers(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "all" or value.isdigit():
        return value
    raise click.BadParameter("must be a number of layers or 'all'")


def model_option(f: F) -> F:
    return click.option("-m", "--model", metavar="GGUF",
                        help="GGUF file or a name in the models directory [default: SmolLM2-135M-Instruct].")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def run_options(f: F) -> F:
    """--model, --preset, --ctx, cache, offload and logging options, collected into `spec: RunSpec`."""
    options = [
        model_option,
        click.option("-p", "--preset", default=DEFAULT_PRESET, show_default=True,
                     help="Context-extension preset (see `localctx presets list`) or a .toml file."),
        click.option("--ctx", type=click.IntRange(16), help="Target context in tokens (overrides the preset's; needed by 'auto')."),
        click.option("--cache-type", type=click.Choice(["f16", "q8_0", "q4_0"]), help="KV cache type for K and V."),
        click.option("--flash-attn/--no-flash-attn", default=None, help="Flash attention [default: the preset's, on]."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "metal"]), default="auto", show_default=True,
                     help="Where to run; cuda/metal fail if this llama.cpp build lacks them."),
        click.option("--gpu-layers", callback=_gpu_layers, metavar="N|all", help="Layers to offload to the GPU."),
        click.option("--threads", type=click.IntRange(1), help="CPU threads [default: all cores]."),
        click.option("--force", is_flag=True, help="Load even when the memory estimate exceeds free memory."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log on stderr."),
    ]
    for option in reversed(options):
        f = option(f)

    def wrapper(**kwargs: Any) -> Any:
        spec = RunSpec(
            model=kwargs.pop("model"), preset=kwargs.pop("preset"), ctx=kwargs.pop("ctx"),
            cache_type=kwargs.pop("cache_type"), flash_attn=kwargs.pop("flash_attn"),
            device=kwargs.pop("device"), gpu_layers=kwargs.pop("gpu_layers"), threads=kwargs.pop("threads"),
            force=kwargs.pop("force"), verbose=kwargs.pop("verbose"),
        )
        return f(spec=spec, **kwargs)

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    wrapper.__click_params__ = getattr(f, "__click_params__", [])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
