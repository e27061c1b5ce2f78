"""cache: the KV snapshots of long documents (list, clear)."""
from __future__ import annotations

import time

import click

from ..options import json_option
from .output import echo_json


@click.group()
def cache() -> None:
    """KV snapshots: the state after a long document, saved so the next prompt that starts with it
    skips evaluating it again (generate --file, chat /read and --file, summarize's one-pass calls).

    Kept in the cache directory's kv/ folder ($LOCALCTX_CACHE_DIR, else the user directory), at most
    $LOCALCTX_KV_CACHE_MAX in all (default 4G), least recently used out first; documents shorter than
    $LOCALCTX_KV_CACHE_MIN_TOKENS (default 2048) are not saved. Pass --no-kv-cache to a command to
    use none. The evaluation cache and the summarizer's store are separate: these commands leave them.

    \b
    Examples:
      localctx cache list
      localctx cache clear
    """


@cache.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List KV snapshots, most recently used first: size, model, preset, tokens, last use.

    \b
    Example:
      localctx cache list --json
    """
    from ..kvcache import KVStore, human

    store = KVStore()
    entries = store.entries()
    total = sum(e.bytes for e in entries)
    if as_json:
        echo_json({"directory": str(store.root), "limit_bytes": store.limit, "total_bytes": total,
                   "snapshots": [e.to_dict() for e in entries]})
        return
    if not entries:
        click.echo(f"No KV snapshots in {store.root}.")
        return
    click.echo(f"{'SIZE':>10}  {'TOKENS':>7}  {'LAST USE':<16}  {'MODEL':<34}  {'PRESET':<12}  SCALING / KV")
    for e in entries:
        h = e.header
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        if "error" in h:
            click.echo(f"{human(e.bytes):>10}  {'?':>7}  {used:<16}  unreadable: {h['error']} ({e.path.name})")
            continue
        click.echo(f"{human(e.bytes):>10}  {e.tokens:>7,}  {used:<16}  {str(h.get('model'))[:34]:<34}  "
                   f"{str(h.get('preset'))[:12]:<12}  {h.get('scaling')} / {h.get('kv_type')}")
    click.echo(f"{len(entries)} snapshot(s), {human(total)} of {human(store.limit)} ({store.root})")


@cache.command()
def clear() -> None:
    """Delete every KV snapshot.

    \b
    Example:
      localctx cache clear
    """
    from ..kvcache import KVStore, human

    store = KVStore()
    count, freed = store.clear()
    click.echo(f"Deleted {count} KV snapshot file(s), {human(freed)}, from {store.root}.")


def register(group: click.Group) -> None:
    group.add_command(cache)
