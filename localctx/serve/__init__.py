"""An OpenAI-compatible HTTP server over one engine, with Anthropic's Messages API beside it
(`localctx serve`; docs/serve.md).

    protocol  request validation and response shapes (the OpenAI wire format, pure data)
    tools     tool calls: tools and tool messages validated, rendered, and calls parsed from the text
    anthropic Anthropic's Messages API (/v1/messages) translated onto the chat core
    worker    the model's own thread: prompts, document boundaries, cancellation
    app       the Starlette app (create_app) and `serve`, which runs it under uvicorn
    limits    connections, file descriptors, read timeouts and rate-limited logs under abuse
    metrics   GET /metrics in Prometheus' text format

Library use:

    import localctx
    from localctx.serve import serve
    with localctx.open_model(preset="auto") as engine:
        serve(engine, port=8080)          # until Ctrl-C / SIGTERM

or `create_app(engine)` for an ASGI app to run under another server.
"""
from __future__ import annotations

from .. import engine as _engine  # noqa: F401  llama.cpp before numpy: see cli.MODEL_COMMANDS
from .app import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, create_app, serve
from .protocol import DEFAULT_MAX_TOKENS

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_TOKENS", "DEFAULT_PORT", "MAX_BODY_BYTES", "create_app", "serve"]
