"""The product's promise past the trained window, on the default model (trained on 8,192 tokens),
at the smallest size that proves it: a prompt just past 8,192 tokens at yarn-32k.

One evaluation of that prompt is shared: its logits are the reference the converted file must
reproduce with no flags, and its KV cache is what the generation then reuses. A one-pass summary of
a document past the trained window is the one other long evaluation. These are the slow tests
(`pytest -m "not slow"` leaves them out for the inner loop); they run in the default suite."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import localctx
from localctx.convert import convert, logits_from_file, verify_positions
from localctx.engine import Engine
from localctx.generate import GenerateRequest, build_prompt_tokens
from localctx.runtime import RunSpec, open_engine
from localctx.summarize import PROMPTS, SummarizeOptions

pytestmark = pytest.mark.slow

TRAINED = 8192
PAST = 128  # tokens past the trained window
QUESTION = "Question: who is this story about? Answer:"
CHARACTERS = ("alice", "rabbit", "queen", "hatter", "cat", "mouse")


@pytest.fixture(scope="module")
def yarn() -> Iterator[Engine]:
    with open_engine(RunSpec(preset="yarn-32k")) as engine:
        yield engine


@pytest.fixture(scope="module")
def document(yarn: Engine, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Alice, cut so that the generate prompt below is just past the trained window."""
    tokens = yarn.tokenize((corpus / "alice.txt").read_text(encoding="utf-8"), add_bos=False)
    path = tmp_path_factory.mktemp("long") / "alice_8k.txt"
    path.write_text(yarn.detokenize(tokens[: TRAINED + PAST - 16]), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    positions: list[int]
    logits: np.ndarray


@pytest.fixture(scope="module")
def reference(yarn: Engine, document: Path) -> Reference:
    """The one long evaluation: the prompt `generate --file DOC QUESTION` builds, at yarn-32k."""
    tokens = build_prompt_tokens(yarn, GenerateRequest(QUESTION, document))
    assert TRAINED < len(tokens) <= TRAINED + PAST + 16
    positions = verify_positions(len(tokens), TRAINED)
    assert positions[-1] > TRAINED  # logits are compared past the trained window
    return Reference(tokens, positions, yarn.logits_at(tokens, positions))


def test_generate_past_the_trained_window(yarn: Engine, document: Path, reference: Reference) -> None:
    gen = localctx.generate_text(yarn, QUESTION, document=document, max_tokens=16)
    assert gen.timings.prompt_tokens == len(reference.tokens) > TRAINED
    assert gen.text.strip() and gen.timings.generated_tokens > 0
    assert (yarn.params.rope_scaling_type, yarn.params.n_ctx, yarn.params.rope_freq_scale) == ("yarn", 32768, 0.25)


def test_converted_file_alone_matches_yarn_past_the_window(yarn: Engine, model_path: Path, reference: Reference,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "smol-yarn-32k.gguf"
    convert(model_path, out, "yarn-32k")
    got = logits_from_file(out, yarn.params, reference.tokens, reference.positions)
    assert np.abs(got.astype(np.float64) - reference.logits.astype(np.float64)).max() <= 1e-4


def test_summarize_past_the_trained_window_in_one_pass(yarn: Engine, document: Path) -> None:
    result = localctx.summarize_files([document], engine=yarn, options=SummarizeOptions(max_summary_tokens=48,
                                                                                        prompt=PROMPTS["fiction"]))
    [record] = result.records
    assert record["status"] == "ok", record["error"]
    assert record["tokens"] > TRAINED and record["preset"] == "yarn-32k"
    assert (record["strategy"], record["chunks"], record["model_calls"]) == ("stuff", 1, 1)
    assert any(name in record["summary"].lower() for name in CHARACTERS), record["summary"]
