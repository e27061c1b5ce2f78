"""Commands, one module per area; each registers itself on the group."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from . import core, chat

    for module in (core, chat):
        module.register(group)
    for name in ("convert", "summarize", "evaluate"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(group)
