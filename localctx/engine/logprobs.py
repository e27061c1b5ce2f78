"""Log-probabilities of sampled tokens, from the model's raw next-token logits: a log-softmax
over the whole vocabulary, before the sampler's bias, penalties, grammar, truncation (top-k,
top-p, min-p) and temperature, so they describe the model, not the sampling settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token, its log-probability, and the `top` most likely tokens (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(row: Any, n_vocab: int, token: int, top: int) -> TokenLogprob:
    """`row`: a pointer to the n_vocab logits of the position the token was sampled from. Read
    at once: the next decode overwrites it."""
    logits = np.ctypeslib.as_array(row, shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    lse = peak + np.log(np.exp(logits - peak).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = tuple((int(i), float(logits[i] - lse)) for i in ids)
    return TokenLogprob(token, float(logits[token] - lse), best)
