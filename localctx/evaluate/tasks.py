"""The synthetic long-context tasks of RULER (Hsieh et al. 2024, NVIDIA/RULER), rebuilt over the
user's own text and seeded random values, and a long-document QA task; each task makes a prompt
of an exact length and scores an answer. Pure Python over a tokenize function, no model.

Where this differs from RULER (NVIDIA/RULER scripts/data/synthetic, eval/synthetic/constants.py):
- the essay haystack is the user's text (RULER: Paul Graham's essays), and the words of the key
  and common-word tasks come from built-in lists and the user's text (RULER: wonderwords, a
  downloaded word list); nothing is downloaded;
- a needle task's first answer needle sits at the asked depth, in tokens (at the unit boundary
  nearest to it); the other needles at RULER's random depths;
- niah_single_word (a word value) is added; qa_1/qa_2 (SQuAD, HotpotQA downloads) are replaced by
  `qa`: one invented fact stated once in the text, scored by token F1 (exact match recorded);
- prompts of the needle, QA and variable-tracking tasks fill the length exactly; the word-list
  tasks fill it as closely as whole words allow, as RULER does.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import string
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .answers import exact_match, first_line, string_match_all, string_match_part, token_f1
from .draws import ADJECTIVES, NOUNS, VALUES, invented, number
from .haystack import NOISE, RANDOM_DEPTHS, Placed, Tokenize, TooShort, essay_units, haystack, line_units

# --- prompts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """How a task's text becomes a prompt: inside the model's chat template as the user's message
    (an instruct model), or raw after BOS. The answer prefix follows `tail`."""

    head: list[int]  # BOS, or the template up to the message
    tail: list[int] = field(default_factory=list)  # the template after the message, to the answer
    chat: bool = False


@dataclass(frozen=True)
class Sample:
    task: str
    tokens: list[int]  # the whole prompt
    answers: list[str]
    gen_tokens: int
    head_end: int  # the frame and the instruction before the context: evaluated alone
    needle_tokens: list[int] = field(default_factory=list)  # where each needle starts in `tokens`
    depths: list[float] = field(default_factory=list)  # the needles' depths in the haystack, as placed


@dataclass
class Build:
    """What a task needs to build one sample."""

    tokenize: Tokenize
    frame: Frame
    length: int  # prompt + generated tokens, as RULER counts a sample's length
    depth: float | None
    rng: random.Random
    sentences: Sequence[str]  # the user's text, for essay haystacks
    vocabulary: Sequence[str]  # the user's words, for common-word extraction

    @functools.cached_property
    def lowered(self) -> str:
        return " ".join(self.sentences).lower()

    def prompt(self, task: Task, before: str, after: str, prefix: str,
               context: Callable[[int], Placed | list[int]], answers: list[str]) -> Sample:
        """frame.head + before + context + after + frame.tail + prefix, the context given the
        tokens left for it (an exact fill, or the most whole items that fit)."""
        tok = self.tokenize
        head = self.frame.head + tok(before)
        rest = tok(after) + self.frame.tail + tok(prefix.lstrip() if self.frame.chat else prefix)
        budget = self.length - task.gen_tokens - len(head) - len(rest)
        try:
            placed = context(budget)
        except TooShort as short:
            need = self.length - budget + short.needed
            raise InputError(f"Task {task.name} needs a length of at least {need:,} tokens; "
                             f"{self.length:,} is too short.") from None
        body = placed.tokens if isinstance(placed, Placed) else placed
        starts = [len(head) + s for s in placed.starts] if isinstance(placed, Placed) else []
        depths = placed.depths if isinstance(placed, Placed) else []
        return Sample(task.name, head + body + rest, answers, task.gen_tokens, len(head), starts, depths)


def fill_most(tokenize: Tokenize, budget: int, make: Callable[[int], str], low: int, high: int) -> list[int]:
    """The tokens of make(n) for the largest n in [low, high] that fit in `budget` (RULER's search)."""
    best = tokenize(make(low))
    if len(best) > budget:
        raise TooShort(len(best))
    while low < high:
        mid = (low + high + 1) // 2
        tokens = tokenize(make(mid))
        if len(tokens) <= budget:
            low, best = mid, tokens
        else:
            high = mid - 1
    return best


class Task:
    name: str
    gen_tokens: int
    uses_depth: bool = False
    template: str
    answer_prefix: str

    def build(self, b: Build) -> Sample:
        raise NotImplementedError

    def score(self, prediction: str, answers: Sequence[str]) -> dict[str, Any]:
        return {"score": string_match_all(prediction, answers)}

    def fingerprint(self) -> str:
        """What a cached result of this task depends on besides its cell: its wording and settings."""
        return hashlib.sha256(repr(sorted(vars(self).items()) + [self.template, self.answer_prefix]).encode()).hexdigest()[:12]


def _split(template: str, **fields: Any) -> tuple[str, str]:
    before, after = template.split("{context}")
    return before.format(**fields), after.format(**fields)


class Niah(Task):
    """Needle in a haystack: 'One of the special magic numbers for KEY is: VALUE.' hidden in a text."""

    template = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {type_v} afterwards.\n{context}\n"
                "What are all the special magic {type_v} for {query} mentioned in the provided text?")
    answer_prefix = " The special magic {type_v} for {query} mentioned in the provided text are"
    needle = "One of the special magic {type_v} for {key} is: {value}."
    gen_tokens = 128
    uses_depth = True

    def __init__(self, name: str, hay: str = "essay", key: str = "words", value: str = "numbers",
                 keys: int = 1, values: int = 1, queries: int = 1) -> None:
        self.name, self.hay, self.key, self.value = name, hay, key, value
        self.keys, self.values, self.queries = max(keys, queries), values, queries

    def build(self, b: Build) -> Sample:
        rng = b.rng
        keys = _distinct(lambda: VALUES[self.key](rng), self.keys)
        values = [[VALUES[self.value](rng) for _ in range(self.values)] for _ in keys]
        asked = rng.sample(range(self.keys), self.queries)
        answers = [v for i in asked for v in values[i]]
        query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
        template, prefix, type_v = self.template + "\x00" + self.answer_prefix, "", self.value
        if self.queries * self.values == 1:  # RULER's singular wording
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_v = type_v[:-1]
        template, prefix = template.split("\x00")
        before, after = _split(template, type_v=type_v, query=query)
        texts = [(k, v, self.needle.format(type_v=self.value, key=keys[k], value=v))
                 for k in range(self.keys) for v in values[k]]
        rng.shuffle(texts)
        first = next(t for t in texts if t[0] == asked[0] and t[1] == values[asked[0]][0])
        sep = " " if self.hay == "essay" else "\n"
        # The first asked needle goes first, at the asked depth; the others at random depths.
        needles = [(b.depth or 0.0, b.tokenize(sep + first[2]))]
        needles += [(rng.choice(RANDOM_DEPTHS), b.tokenize(sep + t[2])) for t in texts if t is not first]
        units = self._units(b, set(keys))
        return b.prompt(self, before, after, prefix.format(type_v=type_v, query=query),
                        lambda budget: haystack(units, budget, needles), answers)

    def _units(self, b: Build, keys: set[str]) -> Iterator[list[int]]:
        if self.hay == "essay":
            return essay_units(b.tokenize, b.sentences, b.rng)
        if self.hay == "noise":
            return line_units(b.tokenize, lambda: NOISE)

        def distractor() -> str:  # another key's needle: never one of the asked keys
            key = _distinct(lambda: VALUES[self.key](b.rng), 1, exclude=keys)[0]
            return self.needle.format(type_v=self.value, key=key, value=VALUES[self.value](b.rng))
        return line_units(b.tokenize, distractor)


class VariableTracking(Task):
    """A chain of assignments (VAR A = 12345, VAR B = VAR A, ...) in filler lines: name every
    variable that holds the value. One worked example comes first, as in RULER."""

    template = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                "Question: Find all variables that are assigned the value {query} in the text above.")
    answer_prefix = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                     "are assigned the value {query}, they are: ")
    gen_tokens = 30

    def __init__(self, name: str = "vt", hops: int = 4) -> None:
        self.name, self.hops = name, hops

    def _chain(self, rng: random.Random, letters: int) -> tuple[list[str], str, list[str]]:
        names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), self.hops + 1)
        value = number(rng, 5)
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(self.hops)]
        return names, value, lines

    def build(self, b: Build) -> Sample:
        rng = b.rng
        names, value, lines = self._chain(rng, 3)
        shown = [x for pair in zip(lines, [NOISE] * len(lines)) for x in pair]
        example = (self.template.format(context="\n".join(shown), query=value)
                   + self.answer_prefix.format(num_v=self.hops + 1, query=value) + " ".join(names) + "\n")
        names, value, lines = self._chain(rng, 5)
        before, after = _split(self.template, query=value)
        depths = sorted(rng.choice(RANDOM_DEPTHS) for _ in lines)  # the chain in order, at random depths
        needles = [(depth, b.tokenize("\n" + line)) for depth, line in zip(depths, lines)]
        units = line_units(b.tokenize, lambda: NOISE)
        return b.prompt(self, example + before, after, self.answer_prefix.format(num_v=self.hops + 1, query=value),
                        lambda budget: haystack(units, budget, needles), names)


class CommonWords(Task):
    """A numbered list of words, ten of them repeated more often: name the ten."""

    template = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
    answer_prefix = " Answer: The top 10 words that appear most often in the list are:"
    gen_tokens = 120
    common = 10

    def __init__(self, name: str = "cwe", freq_common: int = 30, freq_rare: int = 3) -> None:
        self.name, self.freq_common, self.freq_rare = name, freq_common, freq_rare

    def _listing(self, seed: int, words: Sequence[str], n: int, common: int, rare: int) -> tuple[str, list[str]]:
        chosen = words[:n]
        items = list(chosen[: self.common]) * common + list(chosen[self.common:]) * rare
        random.Random(f"{seed}:{n}").shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), list(chosen[: self.common])

    def build(self, b: Build) -> Sample:
        # RULER's smaller frequencies below 4K, where 30 repeats of ten words would fill the list.
        short = b.length < 4096
        common, rare = (6, 1) if short else (self.freq_common, self.freq_rare)
        words = b.rng.sample(list(b.vocabulary), len(b.vocabulary))
        if len(words) < 40 + self.common + 1:  # the worked example's 40, the answers and one other word
            raise InputError(f"Task {self.name} needs a text with at least {40 + self.common + 1} distinct words; "
                             f"it has {len(words)}.")
        seed = b.rng.randrange(2**32)
        shot, shot_answer = self._listing(seed, words[-40:], 20 if short else 40, 3 if short else 10, 1 if short else 3)
        example = (self.template.format(context=shot) + self.answer_prefix + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)) + "\n")
        before, after = _split(self.template)
        pool = words[:-40]
        return b.prompt(self, example + before, after, self.answer_prefix,
                        lambda budget: fill_most(b.tokenize, budget,
                                                 lambda n: self._listing(seed, pool, n, common, rare)[0],
                                                 self.common + 1, len(pool)), pool[: self.common])


class FrequentWords(Task):
    """Coded words drawn from a Zipf distribution (alpha 2): name the three most frequent."""

    template = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
    answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    gen_tokens = 50

    def __init__(self, name: str = "fwe", alpha: float = 2.0, letters: int = 6) -> None:
        self.name, self.alpha, self.letters = name, alpha, letters

    def _text(self, vocab: Sequence[str], n: int, seed: int) -> str:
        zeta = math.pi ** 2 / 6 if self.alpha == 2.0 else sum(k ** -self.alpha for k in range(1, 100_000))
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -self.alpha / zeta))]
        random.Random(seed).shuffle(words)
        return " ".join(words)

    def build(self, b: Build) -> Sample:
        size = max(8, (b.length - self.gen_tokens) // 50)  # RULER's vocabulary size
        vocab = _distinct(lambda: "".join(b.rng.choices(string.ascii_lowercase, k=self.letters)), size)
        vocab[0] = "..."  # the most frequent "word" is noise, as in RULER
        seed = b.rng.randrange(2**32)
        before, after = _split(self.template)
        return b.prompt(self, before, after, self.answer_prefix,
                        lambda budget: fill_most(b.tokenize, budget, lambda n: self._text(vocab, n, seed), 10, budget),
                        vocab[1:4])


FACTS = (
    ("{name} named the new grey mare {word}.", "What did {name} name the new grey mare?", "word"),
    ("The gate code of {name}'s workshop is {number}.", "What is the gate code of {name}'s workshop?", "number"),
    ("{name} hid the brass key under the {thing}.", "Where did {name} hide the brass key?", "thing"),
    ("{name} was born in a village called {word}.", "In which village was {name} born?", "word"),
    ("{name} paid {number} silver coins for the old map.", "How many silver coins did {name} pay for the old map?", "number"),
)


class DocumentQA(Task):
    """Long-document QA: one invented fact stated once in the text, at a chosen depth; the answer
    is a random draw (an invented word, a number, an object), so it cannot be guessed from the
    question, only read. Scored by token F1 of the answer's first line; exact match recorded."""

    template = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
                "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
    answer_prefix = " Answer:"
    gen_tokens = 32
    uses_depth = True

    def __init__(self, name: str = "qa") -> None:
        self.name = name

    def build(self, b: Build) -> Sample:
        rng = b.rng
        fact, question, slot = rng.choice(FACTS)
        name = f"{invented(rng, 2)} {invented(rng, 3)}"
        answer = {"word": invented(rng, 3), "number": number(rng, 6),
                  "thing": f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"}[slot]
        while slot == "thing" and answer in b.lowered:  # stated once: not already in the text
            answer = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        needle = [(b.depth, b.tokenize(" " + fact.format(name=name, **{slot: answer})))]
        before, after = _split(self.template, query=question.format(name=name))
        units = essay_units(b.tokenize, b.sentences, rng)
        return b.prompt(self, before, after, self.answer_prefix,
                        lambda budget: haystack(units, budget, needle), [answer])

    def score(self, prediction: str, answers: Sequence[str]) -> dict[str, Any]:
        line = first_line(prediction)
        return {"score": max(token_f1(line, a) for a in answers), "em": max(exact_match(line, a) for a in answers),
                "match": string_match_part(prediction, answers)}


def _distinct(make: Callable[[], str], n: int, exclude: Collection[str] = ()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        if (x := make()) not in out and x not in exclude:
            out.append(x)
    return out


TASKS: dict[str, Task] = {t.name: t for t in [
    Niah("niah_single_1", hay="noise"),
    Niah("niah_single_2"),
    Niah("niah_single_3", value="uuids"),
    Niah("niah_single_word", value="words"),
    Niah("niah_multikey_1", keys=4),
    Niah("niah_multikey_2", hay="needle"),
    Niah("niah_multikey_3", hay="needle", key="uuids", value="uuids"),
    Niah("niah_multivalue", values=4),
    Niah("niah_multiquery", queries=4),
    VariableTracking(),
    CommonWords(),
    FrequentWords(),
    DocumentQA(),
]}
RETRIEVAL = [name for name in TASKS if name.startswith("niah")]


def vocabulary(text: str) -> list[str]:
    """The text's distinct plain words (3 to 12 letters, lower case), sorted: common-word material."""
    return sorted({w for w in re.findall(r"\b[a-z]{3,12}\b", text)})


def parse_tasks(text: str) -> list[str]:
    """'all', 'niah', or a comma-separated list of task names."""
    names: list[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        group = list(TASKS) if item == "all" else RETRIEVAL if item == "niah" else [item]
        for name in group:
            if name not in TASKS:
                raise InputError(f"Unknown task {name!r}; choose from all, niah, {', '.join(TASKS)}.")
            names.append(name)
    if not names:
        raise InputError("Give at least one task.")
    return list(dict.fromkeys(names))


def sample_rng(seed: int, task: str, length: int, depth: float | None, sample: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{depth}:{sample}")
