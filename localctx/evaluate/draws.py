"""Seeded random values the synthetic tasks hide and ask for: numbers, word pairs, UUIDs and
invented names (RULER's value types; the words are built in, nothing is downloaded)."""
from __future__ import annotations

import random
import uuid
from collections.abc import Callable

ADJECTIVES = ("amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "daring",
              "distant", "dusty", "eager", "early", "fancy", "fierce", "frozen", "gentle", "giant", "golden",
              "hollow", "humble", "hungry", "icy", "jolly", "lazy", "little", "lively", "lonely", "lucky",
              "misty", "modern", "narrow", "noisy", "odd", "patient", "polite", "proud", "quiet", "rapid",
              "rusty", "shiny", "silent", "silver", "sleepy", "smooth", "spicy", "steady", "sturdy", "tender",
              "tidy", "velvet", "wild", "wise", "wooden", "yellow")
NOUNS = ("anchor", "apron", "badger", "basket", "beacon", "blanket", "bottle", "bucket", "cabinet", "candle",
         "canyon", "carpet", "castle", "cellar", "chimney", "compass", "cottage", "crayon", "dolphin", "drum",
         "falcon", "feather", "fiddle", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle",
         "ladder", "lantern", "meadow", "mirror", "needle", "orchard", "otter", "paddle", "pebble", "pillow",
         "pocket", "puzzle", "rabbit", "ribbon", "saddle", "shovel", "spoon", "teapot", "thimble", "tunnel",
         "violin", "wagon", "walnut", "window")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["bri", "dra", "kel", "mor", "thal", "ven", "quin"]


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def invented(rng: random.Random, syllables: int = 3) -> str:
    """A name no model has seen: it cannot be guessed, only read."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


VALUES: dict[str, Callable[[random.Random], str]] = {"numbers": number, "words": word_pair, "uuids": uuid4}
