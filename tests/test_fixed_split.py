"""The engine's fixed prompt splits (Engine.generate's head_end): a call's logits do not depend on
what the engine ran before, so one process and any worker of a cluster give the same answer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from localctx.engine import Engine
from localctx.summarize import DEFAULT_PROMPT, Frame


def first_logits(engine: Engine, tokens: list[int], head: int) -> np.ndarray:
    engine.generate(tokens, max_tokens=1, temperature=0.0, head_end=head).finish()
    return engine.last_logits()


def test_a_fixed_head_makes_a_call_independent_of_the_call_before(native_engine: Engine, corpus: Path) -> None:
    text = (corpus / "alice.txt").read_text(encoding="utf-8")
    start = text.index("Alice was beginning")
    body = text[start:start + 2500]
    frame = Frame.render(native_engine, DEFAULT_PROMPT)
    head = len(frame.head)
    # B shares A's instruction and most of its text: prefix reuse would evaluate only B's end.
    a = frame.tokens(native_engine, body)
    b = frame.tokens(native_engine, body[:2000] + " The Queen of Hearts shouted at the gardeners.")
    native_engine.reset_cache()
    fresh = first_logits(native_engine, b, head)
    native_engine.reset_cache()
    native_engine.complete(a, max_tokens=4, temperature=0.0, head_end=head)
    after_a = first_logits(native_engine, b, head)
    again = first_logits(native_engine, b, head)  # the very same prompt cached: still the same split
    assert np.array_equal(after_a, fresh) and np.array_equal(again, fresh)
