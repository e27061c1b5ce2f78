"""What a RULER-style grid says: mean scores per task and length, the effective length of each
preset, and the comparison table (retrieval, QA, short-text score, effective length).

Effective length: the longest measured length L at which the preset's mean score over the tasks,
and at every measured length below L, is at least `threshold` × the baseline, the `native`
preset's mean at the shortest measured length. RULER uses an absolute 85.6 (Llama-2-7B's score at
4K), calibrated for 7B models; a small model never reaches it even at its best, so the baseline
here is the same model at its own short length, and 0.85 keeps RULER's sense of "within about 15 %
of a model that works". A length below which the preset fails even once ends the count: a method
is only as long as its first failure. While the grid's next length is not run yet, the effective
length is a lower bound and reads ">=4K"."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .grid import Cell, EvalResult
from .tasks import RETRIEVAL

DEFAULT_THRESHOLD = 0.85
GROUPS = {  # the table's columns: RULER's task families
    "single": ["niah_single_1", "niah_single_2", "niah_single_3", "niah_single_word"],
    "multikey": ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3"],
    "multivalue": ["niah_multivalue"], "multiquery": ["niah_multiquery"],
    "vt": ["vt"], "cwe": ["cwe"], "fwe": ["fwe"], "qa": ["qa"],
}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def task_means(cells: Sequence[Cell]) -> dict[tuple[str, int, str], float | None]:
    """Mean score per (preset, length, task); None while any of its samples is not run or n/a."""
    groups: dict[tuple[str, int, str], list[float | None]] = {}
    for c in cells:
        groups.setdefault((c["preset"], c["length"], c["task"]), []).append(c["score"] if c["status"] == "ok" else None)
    return {k: None if None in v else _mean([x for x in v if x is not None]) for k, v in groups.items()}


def mean_over(means: dict[tuple[str, int, str], float | None], preset: str, length: int,
              tasks: Sequence[str]) -> float | None:
    """The mean of the tasks' means: RULER's average, complete or nothing."""
    values = [means.get((preset, length, t)) for t in tasks]
    return None if not values or None in values else _mean([v for v in values if v is not None])


@dataclass(frozen=True)
class PresetSummary:
    preset: str
    scores: dict[int, float | None]  # mean over the tasks, per length
    effective: int | None  # None: not even the shortest length passes (or no baseline)
    retrieval: tuple[int, float] | None  # the needle tasks' mean at the longest complete length
    qa: tuple[int, float] | None
    short: float | None  # the mean at the shortest length
    short_delta: float | None  # against native's
    # The next length of the grid is not run yet: the preset may reach further than `effective`.
    at_least: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "scores": {str(k): v for k, v in self.scores.items()},
                "effective_length": self.effective, "effective_length_at_least": self.at_least,
                "retrieval": self.retrieval, "qa": self.qa,
                "short_text": self.short, "short_text_delta": self.short_delta}


@dataclass(frozen=True)
class Summary:
    baseline: float | None  # native's mean at the shortest length
    threshold: float
    presets: list[PresetSummary]
    lengths: list[int]

    @property
    def bar(self) -> float | None:
        return None if self.baseline is None else self.threshold * self.baseline

    def winners(self) -> dict[int, list[str]]:
        """The best preset(s) at each length, by mean score."""
        out = {}
        for n in self.lengths:
            known = {p.preset: p.scores[n] for p in self.presets if p.scores.get(n) is not None}
            if known:
                best = max(known.values())
                out[n] = [p for p, s in known.items() if s == best]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "threshold": self.threshold, "bar": self.bar,
                "presets": [p.to_dict() for p in self.presets],
                "winners": {str(k): v for k, v in self.winners().items()}}


def effective_length(scores: dict[int, float | None], bar: float | None) -> int | None:
    best = None
    for n in sorted(scores):
        s = scores[n]
        if bar is None or s is None or s < bar:
            break
        best = n
    return best


def _unmeasured_beyond(cells: Sequence[Cell], preset: str, lengths: Sequence[int], effective: int | None,
                       scores: dict[int, float | None]) -> bool:
    """Whether the grid's next length after `effective` is still to run (not n/a: a length past
    what the preset can run ends its reach for certain)."""
    longer = [n for n in lengths if effective is not None and n > effective]
    return bool(longer) and scores[longer[0]] is None and _absent(cells, preset, longer[0]) != "n/a"


def _longest(means: dict[tuple[str, int, str], float | None], preset: str, lengths: Sequence[int],
             tasks: Sequence[str]) -> tuple[int, float] | None:
    for n in sorted(lengths, reverse=True):
        if (s := mean_over(means, preset, n, tasks)) is not None:
            return n, s
    return None


def summarize(result: EvalResult, threshold: float = DEFAULT_THRESHOLD) -> Summary:
    presets, lengths, tasks = result.settings["presets"], sorted(result.settings["lengths"]), result.settings["tasks"]
    means = task_means(result.cells)
    shortest = lengths[0]
    baseline = mean_over(means, "native", shortest, tasks) if "native" in presets else None
    bar = None if baseline is None else threshold * baseline
    rows = []
    for p in presets:
        scores = {n: mean_over(means, p, n, tasks) for n in lengths}
        short, effective = scores[shortest], effective_length(scores, bar)
        rows.append(PresetSummary(
            p, scores, effective,
            _longest(means, p, lengths, [t for t in tasks if t in RETRIEVAL]) if set(tasks) & set(RETRIEVAL) else None,
            _longest(means, p, lengths, ["qa"]) if "qa" in tasks else None,
            short, None if short is None or baseline is None else short - baseline,
            _unmeasured_beyond(result.cells, p, lengths, effective, scores)))
    return Summary(baseline, threshold, rows, lengths)


# --- tables ---------------------------------------------------------------------------------------

def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _score(x: float | None, absent: str = "-") -> str:
    return absent if x is None else f"{x:.2f}"


def _absent(cells: Sequence[Cell], preset: str, length: int) -> str:
    mine = [c for c in cells if c["preset"] == preset and c["length"] == length]
    return "n/a" if mine and all(c["status"] == "n/a" for c in mine) else "-"


def ruler_table(result: EvalResult, threshold: float = DEFAULT_THRESHOLD) -> str:
    """Rows of preset × length; columns the task families and the mean; then the effective lengths."""
    tasks = result.settings["tasks"]
    means = task_means(result.cells)
    groups = {g: [t for t in members if t in tasks] for g, members in GROUPS.items()}
    groups = {g: m for g, m in groups.items() if m}
    width = max([len(p) for p in result.settings["presets"]] + [6])
    lines = [f"{'preset':<{width}}{'length':>8}" + "".join(f"{g:>11}" for g in groups) + f"{'mean':>8}"]
    for preset in result.settings["presets"]:
        for n in sorted(result.settings["lengths"]):
            absent = _absent(result.cells, preset, n)
            cols = "".join(f"{_score(mean_over(means, preset, n, m), absent):>11}" for m in groups.values())
            lines.append(f"{preset:<{width}}{_k(n):>8}{cols}{_score(mean_over(means, preset, n, tasks), absent):>8}")
    return "\n".join(lines + ["", effective_lines(summarize(result, threshold))])


def effective_lines(summary: Summary) -> str:
    if summary.baseline is None:
        if "native" in [p.preset for p in summary.presets]:
            return f"effective length: not yet (native's cells at {_k(summary.lengths[0])} are its baseline)"
        return ("effective length: needs the native preset at the shortest length as its baseline "
                "(add native to --presets)")
    head = (f"effective length (mean >= {summary.threshold:g} x native's {summary.baseline:.2f} at "
            f"{_k(summary.lengths[0])} = {summary.bar:.2f}):")
    parts = [f"{p.preset} {_effective(summary, p, 'below ')}" for p in summary.presets]
    return head + " " + ", ".join(parts)


def _effective(summary: Summary, p: PresetSummary, below: str) -> str:
    """The effective length; '-' while the shortest length is not measured (not a failure), '>='
    while the next length is."""
    if summary.baseline is None or p.short is None:
        return "-"
    if not p.effective:
        return below + _k(summary.lengths[0])
    return (">=" if p.at_least else "") + _k(p.effective)


def report_table(summary: Summary) -> str:
    """The comparison table, one row per preset: the seed's four columns and the effective length."""
    width = max([len(p.preset) for p in summary.presets] + [6])
    head = (f"{'preset':<{width}}{'retrieval':>14}{'QA (F1)':>14}{'short-text':>16}{'effective':>11}"
            f"{'fine-tuning':>13}")
    lines = [head]
    for p in summary.presets:
        at = lambda x: "-" if x is None else f"{x[1]:.2f} @ {_k(x[0])}"  # noqa: E731
        short = "-" if p.short is None else f"{p.short:.2f}" + ("" if p.short_delta is None else f" ({p.short_delta:+.3f})")
        eff = _effective(summary, p, "<")
        lines.append(f"{p.preset:<{width}}{at(p.retrieval):>14}{at(p.qa):>14}{short:>16}{eff:>11}{'no':>13}")
    lines.append("")
    lines.append("retrieval: the needle tasks' mean, QA: token F1, each at the preset's longest complete length; "
                 f"short-text: the mean at {_k(summary.lengths[0])} (against native's); fine-tuning: none of "
                 "these presets needs any.")
    lines.append(effective_lines(summary))
    winners = summary.winners()
    if winners:
        lines.append("best at each length: " + ", ".join(f"{_k(n)} {'/'.join(w)}" for n, w in winners.items()))
    return "\n".join(lines)
