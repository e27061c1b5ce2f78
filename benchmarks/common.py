"""Shared by the benchmark scripts: a raw llama_cpp.Llama built from the very RuntimeParams a
localctx engine loaded with, so "localctx vs raw" compares the same llama.cpp configuration."""
from __future__ import annotations

import sys
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from localctx.engine import _CACHE_TYPES, _SCALING_TYPES, Engine, default_threads  # noqa: E402


def raw_llama(engine: Engine) -> llama_cpp.Llama:
    p = engine.params
    return llama_cpp.Llama(
        model_path=str(engine.facts.path), n_ctx=p.n_ctx, n_batch=p.n_batch, n_ubatch=p.n_ubatch,
        n_threads=default_threads(), n_threads_batch=default_threads(), n_gpu_layers=engine.gpu_layers,
        rope_scaling_type=_SCALING_TYPES[p.rope_scaling_type], rope_freq_base=p.rope_freq_base,
        rope_freq_scale=p.rope_freq_scale, yarn_ext_factor=p.yarn_ext_factor, yarn_attn_factor=p.yarn_attn_factor,
        yarn_beta_fast=p.yarn_beta_fast, yarn_beta_slow=p.yarn_beta_slow, yarn_orig_ctx=p.yarn_orig_ctx,
        flash_attn=p.flash_attn, type_k=_CACHE_TYPES[p.type_k], type_v=_CACHE_TYPES[p.type_v], seed=0, verbose=False)
