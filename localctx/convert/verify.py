"""Verifying a converted file: its logits with no RoPE settings against the original's with the
preset, at positions on both sides of the trained context (see docs/convert.md)."""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..gguf_meta import facts_from_header, read_header
from ..params import RuntimeParams
from ..presets import Ladder, file_params
from .plan import Plan

DEFAULT_TOLERANCE = 1e-3
# A bake of tuned YaRN into rope_freqs passes --verify when its logits differ from the preset's by at
# most this many times what a one-step (float32) change of the frequency scale does to them. Measured
# in docs/convert.md: the bake differs by 0.8-1.1x that noise floor on the Q4_1 default model and 2.0x
# on an F32 copy of it, where a YaRN with other betas differs by 33-43x.
NOISE_MULTIPLE = 4.0
VERIFY_EXTRA_TOKENS = 256  # how far past the trained context --verify runs




@dataclass(frozen=True)
class VerifyResult:
    tokens: int
    positions: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    seconds: float
    noise_floor: float | None = None  # measured for bakes through rope_freqs (see verify_conversion)

    @property
    def threshold(self) -> float:
        """The largest difference accepted: the tolerance, or NOISE_MULTIPLE times the noise floor."""
        return self.tolerance if self.noise_floor is None else max(self.tolerance, NOISE_MULTIPLE * self.noise_floor)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "positions": list(self.positions), "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "noise_floor": self.noise_floor, "threshold": self.threshold,
                "passed": self.passed, "seconds": round(self.seconds, 2)}


FALLBACK_TEXT = (
    "The converter copies every tensor unchanged and only rewrites the metadata that tells the runtime "
    "how to rotate positions. A long prompt checks that the file alone reproduces the preset. "
)


def check_verifiable(plan: Plan) -> None:
    """--verify runs IN under the preset's runtime settings as the reference: refuse where none
    can stand for the file (per-dimension factors have no runtime setting), before writing."""
    p, prov = plan.params, plan.facts.provenance
    if p.rope_freqs:
        raise ConversionError(
            f"--verify compares OUT with IN run under the preset's llama.cpp settings, and preset {p.preset!r}'s "
            "per-dimension factors have none; nothing was written. Convert without --verify (the factors are "
            "written exactly as the preset gives them)."
        )
    if prov is not None and prov.baked_freqs:
        raise ConversionError(
            f"{plan.source.name} carries per-dimension RoPE factors an earlier conversion baked in (preset "
            f"{prov.preset}), which no runtime setting removes, so it cannot stand for the original model in "
            f"--verify; nothing was written. Convert and verify from the original file ({prov.source_file})."
        )


def verify_conversion(original: Path, converted: Path, params: RuntimeParams, *, text: str | None = None,
                      n_tokens: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                      threads: int | None = None, noise_probe: bool = False) -> VerifyResult:
    """Run one prompt longer than the trained context through the original (with the preset's
    runtime parameters) and the converted file (with none), and compare the logits.

    `noise_probe` (bakes of YaRN into rope_freqs, whose angles come from other float operations than
    the runtime's, so never bit-exact): also run the original with the frequency scale one float32
    step away, and accept differences up to NOISE_MULTIPLE times the difference that step makes."""
    start = time.perf_counter()
    n = min(params.n_ctx, n_tokens or params.trained_ctx + VERIFY_EXTRA_TOKENS)
    tokens, positions, expected = _reference_logits(original, params, text, n, threads)
    noise = None
    if noise_probe:
        _, _, nudged = _reference_logits(original, replace(params, rope_freq_scale=_next_float32(params.rope_freq_scale)),
                                         text, n, threads)
        noise = _max_diff(expected, nudged)
    got = logits_from_file(converted, params, tokens, positions, threads=threads)
    return VerifyResult(len(tokens), tuple(positions), _max_diff(expected, got), tolerance,
                        time.perf_counter() - start, noise)


def _reference_logits(original: Path, params: RuntimeParams, text: str | None, n: int,
                      threads: int | None) -> tuple[list[int], list[int], Any]:
    from ..runtime import Resolved, RunSpec, open_engine  # loads llama_cpp: only --verify needs it

    facts = facts_from_header(read_header(original))
    with open_engine(Resolved(RunSpec(model=original, threads=threads), facts, Ladder((params,)))) as engine:
        tokens = prompt_tokens(engine, text, n)
        positions = verify_positions(len(tokens), params.trained_ctx)
        return tokens, positions, engine.logits_at(tokens, positions)


def _max_diff(a: Any, b: Any) -> float:
    diff = float(abs(a.astype("float64") - b.astype("float64")).max())
    return math.inf if math.isnan(diff) else diff


def _next_float32(value: float) -> float:
    """The float32 just above `value` (llama.cpp holds the frequency scale as a C float)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def logits_from_file(converted: Path, params: RuntimeParams, tokens: list[int], positions: list[int], *,
                     threads: int | None = None) -> Any:
    """Logits of `converted` run with no RoPE settings at all, as a plain llama-server run would
    (only the window and the context settings of `params`): what the file alone carries."""
    from ..runtime import Resolved, RunSpec, open_engine

    facts = facts_from_header(read_header(converted))
    from_file = replace(file_params(facts, params.n_ctx), flash_attn=params.flash_attn, type_k=params.type_k,
                        type_v=params.type_v, n_batch=params.n_batch, n_ubatch=params.n_ubatch)
    with open_engine(Resolved(RunSpec(model=converted, threads=threads), facts, Ladder((from_file,)))) as engine:
        return engine.logits_at(tokens, positions)


def prompt_tokens(engine: Any, text: str | None, n: int) -> list[int]:
    """`n` tokens of `text`, repeated when it is too short (a prompt still exercises every position)."""
    text = text or FALLBACK_TEXT
    tokens = engine.tokenize(text, add_bos=True)
    body = engine.tokenize(text, add_bos=False) or tokens
    while len(tokens) < n:
        tokens += body
    return tokens[:n]


def verify_positions(n: int, trained: int) -> list[int]:
    wanted = {n // 4, n // 2, trained - 1, trained, n - 3, n - 2, n - 1}
    return sorted(p for p in wanted if 0 <= p < n)
