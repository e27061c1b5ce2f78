"""Shared by the benchmark scripts: the shared corpus beside the checkout, and a raw
llama_cpp.Llama built with the very arguments a localctx engine was loaded with, so "localctx vs
raw" compares the same llama.cpp configuration."""
from __future__ import annotations

from pathlib import Path

import llama_cpp

import localctx

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def raw_llama(engine: localctx.Engine) -> llama_cpp.Llama:
    return llama_cpp.Llama(**engine.llama_arguments)


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (the peak), RssAnon and RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
