"""Rendering evaluation results: tables for the terminal, CSV, and plots (matplotlib, optional)."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LocalctxError
from ..fsutil import atomic_write, name_max, probe_writable
from .grid import EvalResult
from .passkey import passkey_accuracy
from .summary import summarize


def _absent(cell: dict[str, Any]) -> str:
    return "-" if cell["status"] == "not run" else "n/a"


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def ppl_table(result: EvalResult) -> str:
    lengths = result.settings["lengths"]
    values = {(c["preset"], c["length"]): c for c in result.cells}
    width = max([len(p) for p in result.settings["presets"]] + [6])
    lines = [f"{'preset':<{width}}" + "".join(f"{_length_label(n):>10}" for n in lengths)]
    for preset in result.settings["presets"]:
        row = f"{preset:<{width}}"
        for n in lengths:
            c = values[(preset, n)]
            row += f"{c['ppl']:>10.3f}" if c["status"] == "ok" else f"{_absent(c):>10}"
        lines.append(row)
    return "\n".join(lines)


def _not_run(cells: Iterable[dict[str, Any]]) -> set[tuple[str, int, float]]:
    return {(c["preset"], c["length"], c["depth"]) for c in cells if c["status"] == "not run"}


def passkey_table(result: EvalResult) -> str:
    depths = result.settings["depths"]
    acc, missing = passkey_accuracy(result.cells), _not_run(result.cells)
    width = max([len(p) for p in result.settings["presets"]] + [6])
    lines = [f"{'preset':<{width}}{'length':>8}" + "".join(f"{'d=' + format(d, 'g'):>8}" for d in depths) + f"{'mean':>8}"]
    for preset in result.settings["presets"]:
        for n in result.settings["lengths"]:
            scores = [acc.get((preset, n, d)) for d in depths]
            marks = ["-" if (preset, n, d) in missing else "n/a" for d in depths]
            cols = "".join(f"{m if s is None else format(s, '.2f'):>8}" for s, m in zip(scores, marks))
            known = [s for s in scores if s is not None]
            mean = f"{sum(known) / len(known):.2f}" if known else "n/a"
            lines.append(f"{preset:<{width}}{_length_label(n):>8}{cols}{mean:>8}")
    return "\n".join(lines)


CSV_FIELDS = {
    "ppl": ["preset", "method", "window", "length", "status", "ppl", "nll", "scored_tokens", "evaluated_tokens",
            "chunks", "seconds", "tokens_per_second", "reason"],
    "passkey": ["preset", "method", "window", "length", "depth", "trial", "status", "key", "found", "correct",
                "prompt_tokens", "key_token", "seconds", "answer", "reason"],
    "ruler": ["preset", "method", "window", "length", "task", "depth", "sample", "status", "score", "em", "match",
              "prompt_tokens", "seconds", "answer", "answers", "reason"],
}


def to_csv(result: EvalResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS[result.kind], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in result.cells:
        writer.writerow(cell)
    return out.getvalue()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LocalctxError("--plot needs matplotlib: pip install 'localctx[plot]'") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


# Formats that need more than matplotlib and its own dependencies (pgf needs a LaTeX install).
_EXTERNAL_FORMATS = {"pgf"}


def plot_formats() -> list[str]:
    """The file suffixes --plot can write (without the dot)."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - _EXTERNAL_FORMATS)


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """Refuse a --plot FILE that cannot be written before any cell is computed: matplotlib
    missing, a suffix it cannot draw, a directory that is missing or cannot be written (probed by
    creating and removing a file: access() says yes to root even on a read-only filesystem)."""
    path = Path(path)
    formats = plot_formats()
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise LocalctxError(f"Cannot plot to {path}: the file name must end in one of "
                            f"{', '.join('.' + f for f in formats)} (the format is chosen by the suffix).")
    directory = path.parent
    if not directory.is_dir():
        raise LocalctxError(f"Cannot plot to {path}: the directory {directory} does not exist; create it first.")
    if path.is_dir():
        raise LocalctxError(f"Cannot plot to {path}: it is a directory.")
    limit = name_max(directory)
    if len(os.fsencode(path.name)) > limit:
        raise LocalctxError(f"Cannot plot to {path}: the name is longer than the {limit} bytes "
                            f"the filesystem of {directory} allows.")
    try:
        probe_writable(directory)
    except OSError as exc:
        raise LocalctxError(f"Cannot plot to {path}: cannot write in {directory} ({exc.strerror or exc}).") from None
    return path


def plot(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """Draw the results into `path`, all or nothing: the image is rendered in memory, written to
    a temp file beside `path`, synced and renamed; any failure removes the temp file and raises."""
    path = check_plot_path(path)
    plt = _pyplot()
    fig = {"ppl": _plot_ppl, "passkey": _plot_passkey, "ruler": _plot_ruler}[result.kind](plt, result)
    image = io.BytesIO()
    try:
        fig.savefig(image, format=path.suffix.lower().lstrip("."), dpi=120, bbox_inches="tight")
    except Exception as exc:  # a backend failure: report it, write nothing
        raise LocalctxError(f"Cannot draw the plot for {path}: {exc}") from None
    finally:
        plt.close(fig)
    _write_file(path, image.getbuffer())
    return path


def _write_file(path: Path, data: memoryview) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise LocalctxError(f"Cannot write the plot to {path}: {exc.strerror or exc}; nothing was written.") from None


def _plot_ppl(plt: Any, result: EvalResult) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in result.settings["presets"]:
        points = sorted((c["length"], c["ppl"]) for c in result.cells if c["preset"] == preset and c["status"] == "ok")
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=preset)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = result.settings["lengths"]
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    mode = result.settings["mode"]
    ax.set_title(f"{Path(result.model).name}: {'fixed ' + str(result.settings.get('span')) + '-token span' if mode == 'fixed' else 'chunked'} perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _plot_passkey(plt: Any, result: EvalResult) -> Any:
    presets, lengths, depths = result.settings["presets"], result.settings["lengths"], result.settings["depths"]
    acc, missing = passkey_accuracy(result.cells), _not_run(result.cells)
    fig, axes = plt.subplots(1, len(presets), figsize=(2.2 + 2.6 * len(presets), 0.8 + 0.5 * len(lengths) + 1.5),
                             squeeze=False)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    for ax, preset in zip(axes[0], presets):
        grid = np.array([[np.nan if acc.get((preset, n, d)) is None else acc[(preset, n, d)] for d in depths]
                         for n in lengths], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_xlabel("key depth")
        ax.set_title(preset, fontsize=10)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                absent = "not run" if (preset, lengths[i], depths[j]) in missing else "n/a"
                ax.text(j, i, absent if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("context length")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    fig.suptitle(f"{Path(result.model).name}: passkey retrieval")
    return fig


def _plot_ruler(plt: Any, result: EvalResult) -> Any:
    """The mean score over the tasks against length, one line per preset, and the bar a length
    must clear to count in the effective length."""
    summary = summarize(result, result.settings.get("threshold", 0.85))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in summary.presets:
        points = [(n, s) for n, s in sorted(p.scores.items()) if s is not None]
        if points:
            ax.plot([n for n, _ in points], [s for _, s in points], marker="o", label=p.preset)
    if summary.bar is not None:
        ax.axhline(summary.bar, color="grey", linestyle="--", linewidth=1,
                   label=f"{summary.threshold:g} x native at {_length_label(summary.lengths[0])}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary.lengths, [_length_label(n) for n in summary.lengths])
    ax.set_ylim(0, 1)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"mean score over {len(result.settings['tasks'])} task(s)")
    ax.set_title(f"{Path(result.model).name}: RULER-style tasks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
