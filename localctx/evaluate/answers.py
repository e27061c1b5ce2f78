"""Scoring an answer: RULER's string matching (eval/synthetic/constants.py) and SQuAD's token F1
and exact match for long-document QA."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The share of references found in the prediction (case-insensitive): partial credit."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 when any reference is found in the prediction."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def normalize_answer(text: str) -> str:
    """SQuAD's: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
