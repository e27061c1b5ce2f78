"""Shared Click option decorators, each declared once (the library never imports Click)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .params import C_INT_MAX, DEVICES, KV_CACHE_TYPES, MAX_CTX, MAX_SEED, MIN_CTX, GpuLayers
from .runtime import DEFAULT_PRESET, RunSpec

F = TypeVar("F", bound=Callable[..., Any])


def _gpu_layers(ctx: click.Context, param: click.Parameter, value: str | None) -> GpuLayers:
    if value is None or value == "all":
        return value
    if value.isdigit() and int(value) <= C_INT_MAX:
        return int(value)
    raise click.BadParameter(f"must be a number of layers from 0 to {C_INT_MAX} or 'all'")


def model_option(f: F) -> F:
    return click.option("-m", "--model", metavar="GGUF",
                        help="GGUF file or a name in the models directory [default: SmolLM2-135M-Instruct].")(f)


def ctx_option(f: F) -> F:
    return click.option("--ctx", type=click.IntRange(MIN_CTX, MAX_CTX),
                        help="Target context in tokens (overrides the preset's; needed by 'auto').")(f)


def seed_option(f: F) -> F:
    return click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                        help="Sampling seed.")(f)


def parallel_option(default: int, what: str, note: str = "") -> Callable[[F], F]:
    """--parallel N: how many sequences run at once in one batch (each with the full window)."""
    return click.option("--parallel", type=click.IntRange(1, 256), default=default, show_default=True,
                        help=f"{what} run at once as parallel sequences of one batch, each with the full window "
                             f"(memory is planned for all of them).{' ' + note if note else ''}")


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


_PRESET = click.option("-p", "--preset", default=DEFAULT_PRESET, show_default=True,
                       help="Context-extension preset (see `localctx presets list`) or a .toml file.")
_HOW = [  # how to run, whatever the preset: KV cache, attention, device, threads, memory, logging
    click.option("--cache-type", type=click.Choice(list(KV_CACHE_TYPES)), help="KV cache type for K and V."),
    click.option("--flash-attn/--no-flash-attn", default=None, help="Flash attention [default: the preset's, on]."),
    click.option("--swa-full/--no-swa-full", default=None,
                 help="Sliding-window layers (Gemma 2/3...): cache the whole context, not only the window "
                      "[default: the preset's, off; memory only, results are the same]."),
    click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                 help="Where to run; cuda/metal fail if this llama.cpp build lacks them."),
    click.option("--gpu-layers", callback=_gpu_layers, metavar="N|all", help="Layers to offload to the GPU."),
    click.option("--threads", type=click.IntRange(1), help="CPU threads [default: all cores]."),
    click.option("--force", is_flag=True, help="Load even when the memory estimate exceeds free memory."),
    click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log on stderr."),
]
_HOW_FIELDS = ("cache_type", "flash_attn", "swa_full", "device", "gpu_layers", "threads", "force", "verbose")


_KV_CACHE = click.option("--no-kv-cache", "kv_cache", flag_value=False, default=True,
                         help="Neither restore nor save KV snapshots of long documents (see `localctx cache`).")


def run_options(preset: bool = True, ctx: bool = True, kv_cache: bool = False) -> Callable[[F], F]:
    """--model, --preset, --ctx and the run options, gathered into one `spec: RunSpec` argument.
    Commands that take several presets (eval) or give --ctx another meaning leave those out;
    commands that read long documents add --no-kv-cache."""
    options = ([model_option] + ([_PRESET] if preset else []) + ([ctx_option] if ctx else []) + _HOW
               + ([_KV_CACHE] if kv_cache else []))
    fields = (("model",) + (("preset",) if preset else ()) + (("ctx",) if ctx else ()) + _HOW_FIELDS
              + (("kv_cache",) if kv_cache else ()))

    def decorate(f: F) -> F:
        return _gathered(f, options, lambda kwargs: {"spec": RunSpec(**{name: kwargs.pop(name) for name in fields})})

    return decorate


def _gathered(f: F, options: list[Callable[[Any], Any]], gather: Callable[[dict[str, Any]], dict[str, Any]]) -> F:
    """`f` under `options`, whose values `gather` pops from the keyword arguments and turns into
    the arguments `f` takes instead (one validated object, not a dozen loose values)."""
    def wrapper(**kwargs: Any) -> Any:
        return f(**gather(kwargs), **kwargs)

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))  # type: ignore[attr-defined]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def cluster_options(f: F) -> F:
    """--workers and --ray, gathered into one `executor` argument (api.executor_for: Ray workers when
    either is given, None for this process)."""
    from .cluster import MAX_WORKERS

    options = [
        click.option("--workers", type=click.IntRange(1, MAX_WORKERS), metavar="N",
                     help="Split the work over N worker processes (a local Ray runtime, the CPU threads "
                          "shared between them; with --ray: N workers on the cluster). Needs localctx[ray]."),
        click.option("--ray", "ray_address", metavar="ADDRESS",
                     help="Run on an existing Ray cluster (HOST:PORT, ray://HOST:PORT, or auto for "
                          "$RAY_ADDRESS); its nodes must see the model file. Needs localctx[ray]."),
    ]
    return _gathered(f, options, lambda kwargs: {"executor": _executor(kwargs.pop("workers"), kwargs.pop("ray_address"))})


def _executor(workers: int | None, ray_address: str | None) -> Any:
    from .api import executor_for  # loads llama.cpp first: only when a command that runs the model is invoked

    return executor_for(workers, ray_address)
