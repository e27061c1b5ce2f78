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
