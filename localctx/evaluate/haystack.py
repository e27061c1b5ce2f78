"""Token-exact haystacks for the synthetic long-context tasks: a stream of units (sentences of the
user's text, a repeated filler line, or distractor needles) cut to an exact number of tokens, with
needles inserted at unit boundaries at the depths asked for. Pure Python over a tokenize function:
no model, so every piece is testable on its own."""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import InputError

Tokenize = Callable[[str], list[int]]  # text → tokens, no BOS, no special-token parsing

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's 40 insertion depths (np.linspace(0, 100, 40), rounded), as fractions: where needles that
# are not placed at the asked depth go.
RANDOM_DEPTHS = tuple(round(i * 100 / 39) / 100 for i in range(40))


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"'“‘(]?[A-Z0-9])")
# A full stop that ends a title or an initial ends no sentence ("Mr. Darcy", "J. Smith").
_NOT_AN_END = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Rev|Capt|Col|Gen|Lt|Sgt|Mt|Hon|Messrs|No|Vol)|\b[A-Z])\.$")


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace collapsed (RULER joins its essays the same way, and splits
    them with nltk's tokenizer, which knows titles too)."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(re.sub(r"\s+", " ", text).strip()):
        if out and _NOT_AN_END.search(out[-1]):
            out[-1] += " " + piece
        elif piece:
            out.append(piece)
    return out


MIN_HAYSTACK = 16  # tokens of haystack a context must have besides its needles


class TooShort(InputError):
    """A context that cannot be made in the tokens left for it; `needed`: the fewest it takes."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"A context needs at least {needed:,} tokens.")
        self.needed = needed


@dataclass(frozen=True)
class Placed:
    """A context: the haystack's tokens with the needles in, where each needle starts (an index
    into `tokens`), and at which depth of the haystack it went (its boundary / haystack tokens)."""

    tokens: list[int]
    starts: list[int]
    depths: list[float]
    haystack_tokens: int


def fill(units: Iterator[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """Exactly `budget` tokens of units (the last one cut at a token), and the offsets where a unit
    starts: the places a needle may go without splitting one."""
    stream: list[int] = []
    bounds = [0]
    while len(stream) < budget:
        unit = next(units)
        if not unit:
            raise InputError("The haystack text yields no tokens.")
        stream += unit
        bounds.append(min(len(stream), budget))
    return stream[:budget], sorted(set(bounds))


def nearest(bounds: Sequence[int], target: float) -> int:
    return min(bounds, key=lambda b: (abs(b - target), b))


def place(stream: list[int], bounds: Sequence[int], needles: Sequence[tuple[float, list[int]]]) -> Placed:
    """Insert each needle (depth, tokens) at the unit boundary nearest to depth × len(stream);
    needles at the same boundary keep their order."""
    n = len(stream)
    spots = [(nearest(bounds, depth * n), i) for i, (depth, _) in enumerate(needles)]
    tokens: list[int] = []
    starts = [0] * len(needles)
    cursor = 0
    for at, i in sorted(spots):
        tokens += stream[cursor:at]
        cursor = at
        starts[i] = len(tokens)
        tokens += needles[i][1]
    tokens += stream[cursor:]
    return Placed(tokens, starts, [at / n if n else 0.0 for at, _ in sorted(spots, key=lambda s: s[1])], n)


def essay_units(tokenize: Tokenize, text_sentences: Sequence[str], rng: random.Random) -> Iterator[list[int]]:
    """The user's sentences from a seeded starting point, round and round: each sample reads
    another stretch of the text."""
    if not text_sentences:
        raise InputError("The haystack text has no sentences.")
    i = rng.randrange(len(text_sentences))
    while True:
        yield tokenize(" " + text_sentences[i % len(text_sentences)])
        i += 1


def line_units(tokenize: Tokenize, make: Callable[[], str]) -> Iterator[list[int]]:
    """Lines, each made by `make` (the same filler line, or a fresh distractor needle)."""
    last: tuple[str, list[int]] = ("", [])
    while True:
        line = make()
        if line != last[0]:  # the filler repeats one line: tokenized once
            last = (line, tokenize("\n" + line))
        yield last[1]


def haystack(units: Iterator[list[int]], budget: int, needles: Sequence[tuple[float, list[int]]]) -> Placed:
    """A context of exactly `budget` tokens: the needles, and haystack around them."""
    hay = budget - sum(len(tokens) for _, tokens in needles)
    if hay < MIN_HAYSTACK:
        raise TooShort(budget - hay + MIN_HAYSTACK)
    stream, bounds = fill(units, hay)
    return place(stream, bounds, needles)
