"""Bake a resolved preset into a new GGUF: plan the metadata change, stream an atomic copy, verify.

The output differs from the input only in a handful of metadata entries and, for per-dimension
RoPE factors (a [rope_freqs] preset, or YaRN with tuned betas or factors), in one small tensor,
rope_freqs.weight, added at the end of the data, replaced in place, or removed. Every other
key-value is copied as its raw bytes, every other tensor-info entry is kept as it was, and the
tensor data is streamed byte for byte in bounded pieces (tensor offsets are relative to the data
section, so they stay valid once the data section starts on an aligned boundary again). The new
file appears under its final name only after it is complete and fsynced, so an interrupted run
never leaves a partial OUT.

plan.py decides what changes, encode.py lays out the new bytes, write.py streams and publishes them,
verify.py checks the result by its logits; `convert` below is the one entry point.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from .plan import Plan, override_metadata, plan_conversion
from .verify import (
    DEFAULT_TOLERANCE,
    VerifyResult,
    check_verifiable,
    logits_from_file,
    prompt_tokens,
    verify_conversion,
    verify_positions,
)
from .write import WriteStats, check_output, write_converted

__all__ = ["ConversionResult", "DEFAULT_TOLERANCE", "Plan", "VerifyResult", "WriteStats", "convert", "logits_from_file",
           "override_metadata", "plan_conversion", "prompt_tokens", "verify_conversion", "verify_positions",
           "write_converted"]



@dataclass(frozen=True)
class ConversionResult:
    plan: Plan
    output: Path
    written: bool
    stats: WriteStats | None
    verify: VerifyResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.plan.source),
            "output": str(self.output),
            "preset": self.plan.params.preset,
            "method": self.plan.params.method,
            "params": self.plan.params.to_dict(),
            "changes": [c.to_dict() for c in self.plan.changes],
            "tensor": self.plan.tensor.to_dict() if self.plan.tensor else None,
            "notes": list(self.plan.notes),
            "dry_run": not self.written,
            "written": self.written,
            "bytes": self.stats.bytes if self.stats else None,
            "seconds": round(self.stats.seconds, 3) if self.stats else None,
            "verify": self.verify.to_dict() if self.verify else None,
        }


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], preset: str, *, ctx: int | None = None,
            dry_run: bool = False, force: bool = False, verify: bool = False, verify_text: str | None = None,
            verify_tokens: int | None = None, tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> ConversionResult:
    """Convert SOURCE into OUT with PRESET baked into its metadata (see module docstring).

    With `verify`, the temp file is checked before it is published: a failed check leaves no OUT."""
    out = Path(out).expanduser()
    if dry_run and verify:
        raise ConversionError("--verify needs the converted file; drop --dry-run to convert and verify.")
    plan = plan_conversion(source, preset, ctx)
    if verify:
        check_verifiable(plan)
    if dry_run:
        check_output(plan.source, out, force, probe=False)  # a dry run writes nothing, not even a probe
        return ConversionResult(plan, out, False, None, None)
    results: list[VerifyResult] = []

    def check(tmp: Path) -> None:
        result = verify_conversion(plan.source, tmp, plan.params, text=verify_text, n_tokens=verify_tokens,
                                   tolerance=tolerance, threads=threads, noise_probe=plan.baked_yarn)
        results.append(result)
        if not result.passed:
            raise ConversionError(
                f"Verification failed: the converted file's logits differ from the original's with preset "
                f"{plan.params.preset} by up to {result.max_abs_diff:.3g} (accepted: {result.threshold:.3g}) over "
                f"{result.tokens:,} tokens; {out} was not written."
            )

    stats = write_converted(plan, out, force=force, before_publish=check if verify else None, progress=progress)
    return ConversionResult(plan, out, True, stats, results[0] if results else None)
