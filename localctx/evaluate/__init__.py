"""Long-context evaluation over the engine, in pieces:

- parse:   lengths, depths and preset lists as users write them; the text to score
- cache:   finished cells, one file each (resumable, shareable between runs)
- grid:    the one per-preset loop both evaluations run in, and EvalResult
- ppl:     perplexity against context length (fixed span, or llama-perplexity's windows)
- passkey: passkey retrieval at exact lengths and depths
- haystack, tasks, draws, answers: RULER's synthetic tasks and long-document QA, as prompts of exact lengths, the values they hide, and the scorers
- ruler:   those tasks over the grid; summary: effective length and the comparison table
- render:  tables, CSV and plots

No Click here: the `eval` commands are thin wrappers over `run_ppl`, `run_passkey` and `run_ruler`.
"""
from __future__ import annotations

from .cache import CellCache
from .grid import EvalResult, run_grid
from .parse import Text, default_text_path, load_text, parse_depths, parse_lengths, parse_presets
from .passkey import PasskeyRequest, passkey_accuracy, run_passkey
from .ppl import PplRequest, run_ppl
from .render import passkey_table, plot, ppl_table, to_csv
from .ruler import RulerRequest, run_ruler
from .summary import Summary, report_table, ruler_table, summarize
from .tasks import TASKS, parse_tasks

__all__ = [
    "CellCache", "EvalResult", "PasskeyRequest", "PplRequest", "Text", "default_text_path", "load_text",
    "parse_depths", "parse_lengths", "parse_presets", "passkey_accuracy", "passkey_table", "plot", "ppl_table",
    "run_grid", "run_passkey", "run_ppl", "to_csv", "RulerRequest", "run_ruler", "Summary", "report_table",
    "ruler_table", "summarize", "TASKS", "parse_tasks",
]
