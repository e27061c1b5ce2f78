"""serve: the OpenAI-compatible server."""
from __future__ import annotations

from dataclasses import replace

import click

from ..options import parallel_option, run_options, seed_option
from ..runtime import RunSpec

API_KEY_ENV = "LOCALCTX_API_KEY"
# As localctx.serve.limits.Limits' defaults (a test checks): importing that here would load the model's
# libraries for every command.
DEFAULT_MAX_CONNECTIONS, DEFAULT_HEADER_TIMEOUT, DEFAULT_BODY_TIMEOUT = 1024, 10.0, 60.0
DEFAULT_SSE_PING = 10.0  # as localctx.serve.app.SSE_PING_SECONDS
DEFAULT_PARALLEL = 4  # as llama-server's default slots; RESULTS.md (parallel sequences) measures 1, 4 and 8


@click.command()
@run_options(preset=False, kv_cache=True)
@click.option("-p", "--preset", default="auto", show_default=True,
              help="Context-extension preset (see `localctx presets list`) or a .toml file; auto scales each "
                   "request only as far as its length needs.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port; the address is printed on stderr).")
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request but GET /health.")
@click.option("--max-body-mb", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Largest request body accepted, in MiB (larger: HTTP 413).")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), default=DEFAULT_MAX_CONNECTIONS,
              show_default=True,
              help="Open connections served at once; more get HTTP 503 (GET /health is still answered). "
                   "Lowered to what the file descriptor limit allows.")
@click.option("--header-timeout", type=click.FloatRange(0.1, 3600), default=DEFAULT_HEADER_TIMEOUT,
              show_default=True, help="Seconds a connection has to send a whole request head; then it is closed.")
@click.option("--body-timeout", type=click.FloatRange(0.1, 3600), default=DEFAULT_BODY_TIMEOUT, show_default=True,
              help="Seconds a request body may take to arrive after its head (then HTTP 408).")
@click.option("--sse-ping-interval", type=click.FloatRange(0, 3600), default=DEFAULT_SSE_PING, show_default=True,
              help="Seconds between ': ping' comments on a stream waiting for its first token (a long prompt), "
                   "so clients and proxies do not time out; 0: none.")
@parallel_option(DEFAULT_PARALLEL, "Requests")
@seed_option
def serve(spec: RunSpec, preset: str, host: str, port: int, api_key: str | None, max_body_mb: int,
          max_connections: int, header_timeout: float, body_timeout: float, sse_ping_interval: float,
          parallel: int, seed: int) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models, health).

    Up to --parallel requests run at once (continuous batching), each at the preset's scaling for
    its own length (auto); a prompt
    that starts with a long document the server has seen restores its KV snapshot; a prompt that
    does not fit the largest window is refused with HTTP 400 (context_length_exceeded), never
    truncated. Logs one line per request on stderr (refusals and connection errors at most one a
    second of each kind). Connections beyond --max-connections get HTTP 503; a connection that does
    not send its request head within --header-timeout is closed. Ctrl-C or SIGTERM stops it. See
    docs/serve.md.

    \b
    Examples:
      localctx serve --preset auto --port 8080 --parallel 4
      localctx serve --max-connections 256 --header-timeout 5 --body-timeout 30
      curl -s localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    from ..memory import Workload, estimate, human
    from ..runtime import open_engine
    from ..serve import serve as run_server
    from ..serve.limits import Limits

    spec = replace(spec, preset=preset)
    workload = Workload("generate", parallel)
    with open_engine(spec, seed=seed, workload=workload) as engine:
        windows = ", ".join(f"{step.n_ctx:,}" for step in engine.ladder.steps)
        planned = human(estimate(engine.facts, engine.ladder.top, workload).total)

        def ready(url: str) -> None:
            key = ", API key required" if api_key else ""
            click.echo(f"Serving {engine.facts.path.name} (preset {preset}: windows {windows}; {parallel} parallel "
                       f"sequences of up to {engine.max_ctx:,} tokens, memory planned {planned}) on {url}{key}. "
                       "Ctrl-C to stop.", err=True)

        run_server(engine, host=host, port=port, api_key=api_key or None, max_body_bytes=max_body_mb * 2**20,
                   ready=ready, limits=Limits(max_connections, header_timeout, body_timeout),
                   sse_ping_interval=sse_ping_interval)
    click.echo("Stopped.", err=True)


def register(group: click.Group) -> None:
    group.add_command(serve)
