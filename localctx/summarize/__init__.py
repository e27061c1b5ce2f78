"""Batch summarization: documents → (one pass | chunks → map → reduce) over the engine, resumable.

Per document the strategy comes from real token counts: if the instruction, the whole document and
the answer budget fit the window, one pass ("stuff"); otherwise the text is split at natural
boundaries into chunks that fill the window, each chunk is summarized (map), and the partial
summaries are combined, recursively, until one call holds them all (reduce). With an adaptive
(`auto`) engine chunks and reduce calls fill the unscaled window, and one pass is chosen while the
document needs at most ONE_PASS_MAX_SCALE; every call runs at the scaling its own length needs.

Every completed model call and document is saved in a Store keyed by content hash + model +
resolved parameters + prompt + strategy settings, so a re-run skips finished work and a killed
batch resumes where it stopped. The engine is loaded once per batch, and only when something is left to do.

The package, by concern: `options` (options, records, progress callbacks, store keys), `inputs`
(paths, output files, reading documents), `flow` (a document's plan and rounds of calls, pure),
`summarizer` (the calls on one engine), `batch` (the driver and the one writer of the store)."""
from __future__ import annotations

from ..errors import Interrupted  # noqa: F401  re-exported: callers imported it from here
from .batch import _Batch, store_dir, summarize_batch  # noqa: F401  _Batch: the executors' PendingBatch
from .flow import (Call, Flow, Frame, Group, Plan, Request, _join_parts, document_result,  # noqa: F401
                   error_message, failed_result, group_parts, run_flow, summary_flow)
from .inputs import expand_inputs, output_path, output_paths, read_documents, resolved_inside
from .options import (DEFAULT_PROMPT, ONE_PASS_MAX_SCALE, PROMPTS, REDUCE_NOTE, REPEAT_PENALTY, STORE_VERSION,
                      STRATEGIES, BatchResult, BatchStats, Document, Reporter, Source, SummarizeOptions, call_key,
                      document_key, fingerprint)
from .summarizer import Summarizer

__all__ = [
    "BatchResult", "BatchStats", "Call", "DEFAULT_PROMPT", "Document", "Flow", "Frame", "Group", "Interrupted",
    "ONE_PASS_MAX_SCALE", "PROMPTS", "Plan", "REDUCE_NOTE", "REPEAT_PENALTY", "Reporter", "Request", "STORE_VERSION",
    "STRATEGIES", "Source", "SummarizeOptions", "Summarizer", "call_key", "document_key", "document_result",
    "error_message", "expand_inputs", "failed_result", "fingerprint", "group_parts", "output_path", "output_paths",
    "read_documents", "resolved_inside", "run_flow", "store_dir", "summarize_batch", "summary_flow",
]
