"""Commands, one module per area; each registers itself on the group."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from . import cache, chat, convert, core, evaluate, serve, summarize, tune

    for module in (core, chat, convert, summarize, evaluate, tune, cache, serve):
        module.register(group)
